"""Prometheus for a fleet (``kit fleet prometheus``): a scrape config and alert rules.

Each instance is scraped on its own ``/metrics`` (an instance aggregates its gunicorn workers; nginx's
answer would be a random instance's). The rules record per-version error ratio and p99 latency, then
alert on: an instance down, error ratio or p99 per version above a threshold, failed hot reloads, and
a canary worse than production (error ratio above production's plus a margin, or p99 above a factor of
production's). The canary is told apart through ``kit_slot_version{slot, version}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kit.errors import ServiceError
from kit.fleet._common import parse_address, template_env
from kit.serving.config import ServiceConfig

_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


@dataclass(frozen=True)
class PrometheusOptions:
    """Thresholds and intervals of the generated files (durations in Prometheus syntax: 15s, 5m)."""

    scrape_interval: str = "15s"
    window: str = "5m"  # rate() window of the recorded series
    error_ratio: float = 0.01  # 5xx share per version that alerts
    p99_ms: float = 500.0  # p99 latency per version that alerts
    canary_error_margin: float = 0.005  # canary error ratio above production's plus this alerts
    canary_p99_factor: float = 1.5  # canary p99 above production's times this alerts
    for_: str = "5m"  # how long a condition must hold before it fires


def rules_file_name(cfg: ServiceConfig) -> str:
    return f"kit-{cfg.name}.rules.yml"


def render_prometheus(cfg: ServiceConfig, targets: Sequence[str],
                      options: PrometheusOptions | None = None) -> dict[str, str]:
    """``{"prometheus.yml": ..., "kit-NAME.rules.yml": ...}`` for the instances at ``targets`` (HOST:PORT)."""
    opts = options or PrometheusOptions()
    if not targets:
        raise ServiceError("Give at least one instance to scrape (a target HOST:PORT).")
    addrs = [parse_address(t, "target") for t in targets]
    for value, what in ((opts.scrape_interval, "scrape interval"), (opts.window, "window"), (opts.for_, "for")):
        if not _DURATION.fullmatch(value):
            raise ServiceError(f"{what} {value!r} is not a Prometheus duration such as 15s, 5m or 1h.")
    if not (0 < opts.error_ratio < 1 and opts.p99_ms > 0 and opts.canary_p99_factor >= 1
            and 0 <= opts.canary_error_margin < 1):
        raise ServiceError(f"Invalid thresholds {opts}: 0 < error_ratio < 1, p99_ms > 0, canary_p99_factor >= 1.")
    ctx = {
        "name": cfg.name, "model": cfg.model, "job": f"kit-{cfg.name}", "opts": opts,
        "targets": [f"[{h.strip('[]')}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addrs],
        "rules_file": rules_file_name(cfg), "p99_s": opts.p99_ms / 1000.0,
    }
    env = template_env()
    return {
        "prometheus.yml": env.get_template("prometheus.yml.j2").render(**ctx),
        rules_file_name(cfg): env.get_template("rules.yml.j2").render(**ctx),
    }
