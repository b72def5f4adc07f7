"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set by the generated ``gunicorn.conf.py`` before any
worker starts, so every worker writes its samples to files there and ``/metrics`` (answered by any
worker) aggregates all of them; ``child_exit`` calls ``mark_process_dead``. Without it (tests, a plain
Flask run) the metrics live in this process's own registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class Metrics:
    """The service's metric families; ``multiprocess_dir`` switches to gunicorn multiprocess mode."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None):
        self.multiprocess_dir = multiprocess_dir
        self._own = CollectorRegistry()
        reg = None if multiprocess_dir else self._own  # multiprocess samples live in files, not a registry
        self.requests = Counter("kit_requests_total", "Requests by model version, route reason and status.",
                                ["model", "version", "route", "code"], registry=reg)
        self.latency = Histogram("kit_request_seconds", "Request latency by model version (seconds).",
                                 ["model", "version"], buckets=LATENCY_BUCKETS, registry=reg)
        self.batch = Histogram("kit_batch_rows", "Rows per forward pass (dynamic batching).",
                               ["model", "version"], buckets=BATCH_BUCKETS, registry=reg)
        self.reloads = Counter("kit_reloads_total", "Hot reloads by result (success, failure).",
                               ["model", "result"], registry=reg)
        kw: dict[str, Any] = {"multiprocess_mode": "liveall"} if multiprocess_dir else {}
        self.version = Gauge("kit_served_version", "Version served per slot (per worker).",
                             ["model", "slot"], registry=reg, **kw)
        self.weight = Gauge("kit_canary_weight", "Canary weight in effect (per worker).", ["model"],
                            registry=reg, **kw)
        # The version as a label, so alert rules can join request metrics (labelled by version) to the
        # slot serving it: "canary worse than production" (kit fleet prometheus). 1 while served, else 0.
        self.slot = Gauge("kit_slot_version", "1 for the version a slot serves (per worker), 0 once it stops.",
                          ["model", "slot", "version"], registry=reg, **kw)
        # An info gauge rather than a label on every family: the request metrics' labels (and the alert
        # rules that join them) stay the same whichever backend serves.
        self.backend = Gauge("kit_backend", "1 for the backend this worker serves with (torch, onnxruntime).",
                             ["model", "backend"], registry=reg, **kw)
        self._slots: dict[tuple[str, str], str] = {}

    def observe(self, model: str, version: int | None, route: str, code: int, seconds: float,
                batch: int = 0) -> None:
        v = str(version) if version is not None else "none"
        self.requests.labels(model, v, route, str(code)).inc()
        if version is not None:
            self.latency.labels(model, v).observe(seconds)
            if batch:
                self.batch.labels(model, v).observe(batch)

    def serving_backend(self, model: str, backend: str) -> None:
        self.backend.labels(model, backend).set(1)

    def reload(self, model: str, result: str) -> None:
        self.reloads.labels(model, result).inc()

    def served(self, model: str, state: Any) -> None:
        self.version.labels(model, "production").set(state.production.version if state.production else 0)
        self.version.labels(model, "canary").set(state.canary.version if state.canary else 0)
        self.weight.labels(model).set(state.weight)
        for slot_name, slot in (("production", state.production), ("canary", state.canary)):
            now = str(slot.version) if slot is not None else None
            was = self._slots.get((model, slot_name))
            if was is not None and was != now:
                self.slot.labels(model, slot_name, was).set(0)
            if now is not None:
                self.slot.labels(model, slot_name, now).set(1)
                self._slots[(model, slot_name)] = now
            else:
                self._slots.pop((model, slot_name), None)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg, path=self.multiprocess_dir)
            return generate_latest(reg)
        return generate_latest(self._own)
