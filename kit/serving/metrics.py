"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set by the generated ``gunicorn.conf.py`` before any
worker starts, so every worker writes its samples to files there and ``/metrics`` (answered by any
worker) aggregates all of them; ``child_exit`` calls ``mark_process_dead``. Without it (tests, an app built
in-process) the metrics live in this process's own registry.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import prometheus_client.values
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    mmap_dict,
)
from prometheus_client.mmap_dict import MmapedDict

from kit._types import JSONObject

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class ReservedMmapedDict(MmapedDict):
    """prometheus-client's per-process sample file, with its blocks allocated before they are mapped.

    The library grows a file with ``truncate`` (a sparse file) and writes through the mapping: on a full
    filesystem the first write to an unbacked page is a SIGBUS, and workers crash-looped. Here every size the
    file takes is first ``posix_fallocate``d, so a full filesystem is an ``OSError`` at the sample that
    needed the space (:meth:`Metrics.observe` turns it into degraded metrics), never a signal.
    """

    def __init__(self, filename: str, read_mode: bool = False):
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    os.posix_fallocate(fd, 0, getattr(mmap_dict, "_INITIAL_MMAP_SIZE", 1 << 16))
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        need = self._used + len(key.encode()) + 32  # the library's record: length, key, padding, two doubles
        if need > self._capacity:
            size = self._capacity
            while size < need:
                size *= 2
            os.posix_fallocate(self._f.fileno(), 0, size)  # ENOSPC here, before the mapping grows
        super()._init_value(key)


# Every multiprocess value made from now on (they are made in the workers, after this import) uses it.
prometheus_client.values.MmapedDict = ReservedMmapedDict  # type: ignore[misc]


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

    degraded: str | None = None  # why samples are being dropped (the metrics folder is full), if they are
    dropped = 0

    def observe(self, model: str, version: int | None, route: str, code: int, seconds: float,
                batch: int = 0) -> None:
        v = str(version) if version is not None else "none"
        try:
            self.requests.labels(model, v, route, str(code)).inc()
            if version is not None:
                self.latency.labels(model, v).observe(seconds)
                if batch:
                    self.batch.labels(model, v).observe(batch)
        except OSError as exc:  # the metrics folder is full: answers go on, metrics degrade
            self._degrade(exc)

    def _degrade(self, exc: OSError) -> None:
        self.dropped += 1
        if self.degraded is None:
            self.degraded = (f"metrics are being dropped: cannot grow the samples file in {self.multiprocess_dir} "
                             f"({exc.strerror or exc}); free space there (PROMETHEUS_MULTIPROC_DIR)")
            log.error("%s; requests are still answered", self.degraded)

    def status(self) -> JSONObject:
        """What /readyz says of the metrics: ``ok``, or degraded with why and how many samples were dropped."""
        if self.degraded is None:
            return {"status": "ok"}
        return {"status": "degraded", "reason": self.degraded, "dropped": self.dropped}

    def serving_backend(self, model: str, backend: str) -> None:
        try:
            self.backend.labels(model, backend).set(1)
        except OSError as exc:
            self._degrade(exc)

    def reload(self, model: str, result: str) -> None:
        try:
            self.reloads.labels(model, result).inc()
        except OSError as exc:
            self._degrade(exc)

    def served(self, model: str, state: Any) -> None:
        try:
            self._served(model, state)
        except OSError as exc:
            self._degrade(exc)

    def _served(self, model: str, state: Any) -> None:
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
