"""The canary guard: a service ends a canary that is worse than production, by itself, once.

Every worker of every instance counts its finished inference requests per side (production, canary) in
one-second buckets: requests, 5xx errors and a latency histogram (:meth:`CanaryGuard.observe`, called
from the request-log path, :func:`kit.serving.handlers.log_request`: a lock, a dict lookup, no I/O). A background thread per
worker, every ``interval`` seconds:

1. writes the worker's buckets of the current window to ``<registry>/<model>/guard/<key>/<host>-<pid>.json``
   (atomically), where ``key`` is ``v<canary>-s<aliases serial>``: one folder per canary as every
   instance sees it in ``aliases.json``;
2. reads every worker's file in that folder (all workers of all instances sharing the registry) and sums
   the buckets inside the window, so the counts add up across processes without any coordination but
   the filesystem (a file per writer: no appends from many hosts to one file, which NFS does not make
   atomic; a dead worker's file still counts until its buckets leave the window);
3. decides (:func:`decide`): with at least ``min_requests`` on both sides, a canary whose 5xx rate is
   more than ``max_error_rate_increase`` above production's, or whose p95 latency is more than
   ``max_p95_ratio`` times production's (and ``min_p95_delta_ms`` above it), is ended through
   :func:`kit.traffic.guard_stop`: under the model's lock, only if the canary and the serial are still
   the ones judged, with an audited ``canary_guard`` event carrying the evidence. Workers that decide at
   the same moment race for the lock; the first ends the canary and the others find it gone. One
   decision per key, so the guard never flaps; every instance then follows the alias change as usual.

What a worker knows about the guard (the window's counts, the last decision) is in ``/readyz`` under
``canary_guard`` and in the metrics (``kit_canary_guard_decisions_total``,
``kit_canary_guard_window_requests``, ``kit_canary_guard_error_rate``, ``kit_canary_guard_p95_seconds``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit import service_settings as settings
from kit.errors import ServiceError

log = logging.getLogger(__name__)

SIDES = ("production", "canary")


def _d(key: str) -> Any:
    return settings.default("canary_guard", key)

_RATIO = 1.2  # latency histogram buckets grow by 20%: a p95 is known to within 20%
_BASE = 1e-4  # seconds: bucket 0 holds everything up to 0.1 ms
_TOP = 80  # buckets: the last one holds everything above ~200 s


@dataclass(frozen=True)
class GuardSettings:
    """``[canary_guard]`` in service.toml."""

    enabled: bool = False  # off when the section is absent (services generated before the guard)
    min_requests: int = _d("min_requests")  # per side, inside the window, before anything is decided
    window_s: float = _d("window_s")  # seconds of traffic compared
    max_error_rate_increase: float = _d("max_error_rate_increase")  # canary 5xx rate minus production's
    max_p95_ratio: float = _d("max_p95_ratio")  # canary p95 over production p95
    min_p95_delta_ms: float = _d("min_p95_delta_ms")  # ... and at least this much slower (tiny p95s jitter)
    interval_s: float = _d("interval_s")  # how often a worker shares its counts and judges
    steps: tuple[float, ...] = _d("steps")  # progressive promotion: canary weights in percent, e.g. (5, 25, 50, 100)
    hold_s: float = _d("hold_s")  # seconds a step must stay healthy (with min_requests a side) before the next


def parse_guard_settings(table: Mapping[str, Any], where: str) -> GuardSettings:
    """Check a ``[canary_guard]`` table (``where`` names the file in errors): the declared types and ranges
    (:mod:`kit.service_settings`), then the steps."""
    values = settings.check_section("canary_guard", table, where)
    if "steps" in values:
        steps = values["steps"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 100 for x in steps) \
                or list(steps) != sorted(set(steps)):
            raise ServiceError(f"{where}: [canary_guard] steps = {steps!r} must be increasing percentages in "
                               "(0, 100], e.g. [5, 25, 50, 100] (100 promotes the canary).")
    return GuardSettings(**values)


def bucket_of(seconds: float) -> int:
    """The latency histogram bucket of a duration (log-spaced by ``_RATIO``)."""
    if seconds <= _BASE:
        return 0
    return min(_TOP, 1 + int(math.log(seconds / _BASE, _RATIO)))


def bucket_upper(index: int) -> float:
    """The upper bound of a bucket, in seconds (what a percentile reports)."""
    return float(_BASE * _RATIO ** index)


@dataclass(frozen=True)
class SideStats:
    """One side's window, summed over every worker."""

    requests: int = 0
    errors: int = 0
    hist: tuple[tuple[int, int], ...] = ()  # (bucket, count), sorted

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p95(self) -> float | None:
        """The 95th percentile latency in seconds (a bucket's upper bound), None without requests."""
        total = sum(c for _, c in self.hist)
        if not total:
            return None
        need, seen = math.ceil(0.95 * total), 0
        for b, c in self.hist:
            seen += c
            if seen >= need:
                return bucket_upper(b)
        return bucket_upper(self.hist[-1][0])

    def describe(self) -> dict[str, Any]:
        p95 = self.p95()
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p95_ms": round(p95 * 1000, 3) if p95 is not None else None}


@dataclass(frozen=True)
class Verdict:
    """Why a canary is to be ended: ``reason`` is "errors" or "latency"; ``evidence`` goes into the audit."""

    reason: str
    detail: str
    evidence: dict[str, Any]


def decide(prod: SideStats, canary: SideStats, s: GuardSettings) -> Verdict | None:
    """End the canary? Only with ``min_requests`` on both sides; errors are judged before latency."""
    if prod.requests < s.min_requests or canary.requests < s.min_requests:
        return None
    evidence = {"production": prod.describe(), "canary": canary.describe(), "window_s": s.window_s,
                "thresholds": {"max_error_rate_increase": s.max_error_rate_increase,
                               "max_p95_ratio": s.max_p95_ratio, "min_p95_delta_ms": s.min_p95_delta_ms,
                               "min_requests": s.min_requests}}
    if canary.error_rate - prod.error_rate > s.max_error_rate_increase:
        return Verdict("errors", f"canary 5xx rate {canary.error_rate:.1%} against production's "
                       f"{prod.error_rate:.1%} (over +{s.max_error_rate_increase:.0%})", evidence)
    pp, cp = prod.p95(), canary.p95()
    if pp is not None and cp is not None and cp > pp * s.max_p95_ratio and (cp - pp) * 1000 > s.min_p95_delta_ms:
        return Verdict("latency", f"canary p95 {cp * 1000:.1f} ms against production's {pp * 1000:.1f} ms "
                       f"(over {s.max_p95_ratio:g}x and +{s.min_p95_delta_ms:g} ms)", evidence)
    return None


def merge(docs: list[dict[str, Any]], since: float) -> dict[str, SideStats]:
    """Sum the buckets of workers' window files that lie at or after ``since`` (unix seconds)."""
    n = {s: 0 for s in SIDES}
    err = {s: 0 for s in SIDES}
    hist: dict[str, dict[int, int]] = {s: {} for s in SIDES}
    for doc in docs:
        for b in doc.get("buckets", []):
            side = b.get("side")
            if side not in n or b.get("sec", 0) < since:
                continue
            n[side] += int(b.get("n", 0))
            err[side] += int(b.get("err", 0))
            for k, c in b.get("hist", {}).items():
                hist[side][int(k)] = hist[side].get(int(k), 0) + int(c)
    return {s: SideStats(n[s], err[s], tuple(sorted(hist[s].items()))) for s in SIDES}


class CanaryGuard:
    """One worker's part of the guard (see the module docstring). ``registry`` is the service's
    :class:`kit.registry.Registry`; ``slots`` its :class:`kit.serving.slots.ModelSlots`."""

    def __init__(self, settings: GuardSettings, registry: Any, model: str, slots: Any, metrics: Any = None):
        self.settings = settings
        self.registry = registry
        self.model = model
        self.slots = slots
        self.folder = Path(registry.root) / model / "guard"
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, int], list[Any]] = {}  # (side, sec) -> [n, err, {bucket: count}]
        self._sides: tuple[int | None, int | None] = (None, None)  # (production, canary) versions now
        self._key: str | None = None
        self._key_since = 0.0  # when this worker first saw the current key
        self.window: dict[str, SideStats] = {}
        self.last_decision: dict[str, Any] | None = None
        self.error: str | None = None  # the last failure of the guard thread (e.g. a read-only registry)
        self._decided: set[str] = set()
        self._history_serial = -2  # the aliases serial at which the audit log was last read for /readyz
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gauges = _GuardMetrics(metrics, model) if metrics is not None else None

    # ---- the request path
    def observe(self, version: int | None, status: int, seconds: float) -> None:
        """Count one finished inference request (no I/O: called on the request path)."""
        prod, canary = self._sides
        if canary is None or version is None:
            return
        side = "canary" if version == canary else "production" if version == prod else None
        if side is None:
            return
        key = (side, int(time.time()))
        b = bucket_of(seconds)
        with self._lock:
            cell = self._buckets.get(key)
            if cell is None:
                cell = self._buckets[key] = [0, 0, {}]
            cell[0] += 1
            cell[1] += status >= 500
            cell[2][b] = cell[2].get(b, 0) + 1

    # ---- the guard thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kit-guard-{self.model}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
                self.error = None
            except Exception as exc:  # the guard must never take the worker down; say so (once) and go on
                if str(exc) != self.error:
                    log.exception("%s: canary guard failed (the service keeps serving; retrying every %gs): %s",
                                  self.model, self.settings.interval_s, exc)
                self.error = str(exc)

    def tick(self, now: float | None = None) -> Verdict | None:
        """Follow the serving state, share this worker's window, judge the sum. Returns a verdict acted on."""
        now = time.time() if now is None else now
        state = self.slots.state
        canary = state.canary.version if state.canary is not None else None
        prod = state.production.version if state.production is not None else None
        key = f"v{canary}-s{state.serial}" if canary is not None else None
        if key != self._key:
            with self._lock:
                self._buckets.clear()
            if self._key is not None:
                _forget(self.folder / self._key, self.worker)  # that split is over: its window is history
            self._key, self._sides, self.window, self._key_since = key, (prod, canary), {}, now
        if key is None or key in self._decided:
            return None
        since = now - self.settings.window_s
        folder = self.folder / key
        self._share(folder, since)
        self.window = merge(_read_all(folder), since)
        if self._gauges is not None:
            self._gauges.window(self.window)
        verdict = decide(self.window["production"], self.window["canary"], self.settings)
        if verdict is None:
            if self._healthy_step_due(now):
                self._decided.add(key)  # one step per canary key: the step itself makes a new key
                self._step(canary, prod, state.serial, state.weight)
            return None
        self._decided.add(key)  # one decision per canary, whatever the registry says next
        return self._act(verdict, canary, prod, state.serial, key)

    def _share(self, folder: Path, since: float) -> None:
        from kit._io import atomic_write_json

        with self._lock:
            for k in [k for k in self._buckets if k[1] < since]:
                del self._buckets[k]
            buckets = [{"side": side, "sec": sec, "n": c[0], "err": c[1], "hist": {str(b): n for b, n in c[2].items()}}
                       for (side, sec), c in self._buckets.items()]
        if not buckets and not (folder / f"{self.worker}.json").exists():
            return
        # never parents=True: with the shared registry unmounted that would recreate <registry>/<model> on the
        # local disk under the mount point (the fleet's unreachable-registry test caught it); fail, and retry
        folder.parent.mkdir(exist_ok=True)
        folder.mkdir(exist_ok=True)
        atomic_write_json(folder / f"{self.worker}.json", {"schema": 1, "worker": self.worker,
                                                          "updated": time.time(), "buckets": buckets})

    def _act(self, verdict: Verdict, canary: int | None, prod: int | None, serial: int, key: str) -> Verdict | None:
        from kit.traffic import guard_stop

        assert canary is not None
        evidence = {**verdict.evidence, "reason": verdict.reason, "detail": verdict.detail, "canary_version": canary,
                    "production_version": prod, "aliases_serial": serial, "decided_by": self.worker}
        change = guard_stop(self.registry, self.model, canary, serial, evidence)
        self.last_decision = {**evidence, "ended": change is not None, "ts": time.time()}
        if change is None:  # another worker (or a person) moved the aliases first
            log.info("%s: canary guard judged v%d worse (%s) but the canary had already moved", self.model, canary,
                     verdict.detail)
            return None
        log.warning("%s: canary guard ended canary v%d: %s", self.model, canary, verdict.detail)
        if self._gauges is not None:
            self._gauges.decided(verdict.reason)
        return verdict

    def _healthy_step_due(self, now: float) -> bool:
        s, w = self.settings, self.window
        return bool(s.steps) and now - self._key_since >= s.hold_s and all(
            w[side].requests >= s.min_requests for side in SIDES)

    def _step(self, canary: int | None, prod: int | None, serial: int, weight: float) -> None:
        """Progressive promotion: the next step's weight, or production at 100 (which needs a passing gate)."""
        from kit.traffic import guard_step

        assert canary is not None
        nxt = next((x for x in self.settings.steps if x / 100 > weight + 1e-9), None)
        if nxt is None:
            return
        evidence: dict[str, Any] = {side: st.describe() for side, st in self.window.items()}
        evidence.update(hold_s=self.settings.hold_s, window_s=self.settings.window_s, decided_by=self.worker,
                        from_weight=weight, to_weight=nxt / 100)
        try:
            change = guard_step(self.registry, self.model, canary, serial, nxt / 100, evidence)
        except Exception as exc:  # the gate refused the promotion (or the registry): say so, keep serving
            self.last_decision = {"step": "refused", "version": canary, "error": str(exc), "ts": time.time()}
            log.error("%s: canary guard could not promote v%d at 100%%: %s", self.model, canary, exc)
            return
        if change is not None:
            self.last_decision = {"step": change.action, "version": canary, "weight": nxt / 100, "ts": time.time()}
            log.info("%s: canary guard: v%d healthy for %gs, %s", self.model, canary, self.settings.hold_s,
                     change.describe())

    def status(self) -> dict[str, Any]:
        """What /readyz shows under ``canary_guard``."""
        s = self.settings
        return {"enabled": s.enabled, "key": self._key, "error": self.error, "window_s": s.window_s, "min_requests": s.min_requests,
                "window": {side: st.describe() for side, st in self.window.items()},
                "last_decision": self.last_decision or self._recorded_decision()}

    def _recorded_decision(self) -> dict[str, Any] | None:
        """The newest ``canary_guard`` event this worker did not make itself (another worker or instance)."""
        serial = self.slots.state.serial
        if serial == self._history_serial:  # read once per alias change, not on every probe
            return None
        self._history_serial = serial
        try:
            events = self.registry.history(self.model)
        except Exception:  # a /readyz must answer even if the audit log cannot be read
            return None
        for ev in reversed(events[-200:]):
            if ev.get("event") == "canary_guard":
                self.last_decision = {k: v for k, v in ev.items() if k != "aliases"}
                return self.last_decision
        return None


def _forget(folder: Path, worker: str) -> None:
    """Remove this worker's file of a finished key, and the folder once every worker has."""
    try:
        (folder / f"{worker}.json").unlink(missing_ok=True)
        folder.rmdir()
    except OSError:  # other workers' files are still there (they remove theirs when they move on)
        pass


def _read_all(folder: Path) -> list[dict[str, Any]]:
    import json

    docs = []
    try:
        paths = list(folder.glob("*.json"))
    except OSError:
        return []
    for p in paths:
        try:
            docs.append(json.loads(p.read_bytes()))
        except (OSError, ValueError):  # a file being replaced on a slow filesystem: next tick
            continue
    return docs


class _GuardMetrics:
    def __init__(self, metrics: Any, model: str):
        from prometheus_client import Counter, Gauge

        self.model = model
        reg = None if metrics.multiprocess_dir else metrics._own  # the service's registry (or its files)
        kw: dict[str, Any] = {"multiprocess_mode": "max"} if metrics.multiprocess_dir else {}
        self.decisions = Counter("kit_canary_guard_decisions_total", "Canaries the guard ended, by reason.",
                                 ["model", "reason"], registry=reg)
        self.requests = Gauge("kit_canary_guard_window_requests", "Requests in the guard's window, all workers.",
                              ["model", "side"], registry=reg, **kw)
        self.errors = Gauge("kit_canary_guard_error_rate", "5xx rate in the guard's window, all workers.",
                            ["model", "side"], registry=reg, **kw)
        self.p95 = Gauge("kit_canary_guard_p95_seconds", "p95 latency in the guard's window, all workers.",
                         ["model", "side"], registry=reg, **kw)

    def window(self, stats: dict[str, SideStats]) -> None:
        for side, st in stats.items():
            self.requests.labels(self.model, side).set(st.requests)
            self.errors.labels(self.model, side).set(st.error_rate)
            self.p95.labels(self.model, side).set(st.p95() or 0.0)

    def decided(self, reason: str) -> None:
        self.decisions.labels(self.model, reason).inc()


def make_guard(settings: GuardSettings | None, registry: Any, model: str, slots: Any, metrics: Any,
               start: bool = True) -> CanaryGuard | None:
    """The worker's guard (started), or None when ``[canary_guard]`` is off."""
    if settings is None or not settings.enabled:
        return None
    guard = CanaryGuard(settings, registry, model, slots, metrics)
    if start:
        guard.start()
    return guard


__all__ = ["CanaryGuard", "GuardSettings", "SideStats", "Verdict", "decide", "make_guard", "merge",
           "parse_guard_settings"]
