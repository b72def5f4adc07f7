"""The fleet: many instances of one service, one shared registry, the engines users already run.

Each function reads a generated service's settings (``service.toml``) and writes configuration for a
standard tool, so limits, timeouts, headers and health endpoints agree with the service:

- :func:`kit.fleet.nginx.render_nginx`: nginx in front of N instances (keep-alive, retries of
  inference on the next instance, passive health, body limit and timeouts from service.toml).
- :func:`kit.fleet.prometheus.render_prometheus`: a scrape config and alert rules.
- :func:`kit.fleet.k8s.render_k8s`: Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler.

Templates live in ``kit/templates/fleet/``. Nothing here imports torch or starts a process.
"""

from __future__ import annotations

from kit.fleet._common import parse_address, service_settings, write_files

__all__ = ["parse_address", "service_settings", "write_files"]
