"""The canary guard: a service ends a canary that is worse than production, by itself, once.

Every worker of every instance counts its finished inference requests per side (production, canary) in
time slots: requests, 5xx errors and a latency histogram (:meth:`CanaryGuard.observe`, called from
:func:`kit.serving.handlers.log_request`: a lock, a dict lookup, no I/O). A thread per worker, every
``interval`` seconds:

1. writes the worker's slots of the window to ``<registry>/<model>/guard/<key>/<host>-<pid>.json``, ``key``
   being ``v<canary>-s<aliases serial>``, with a MAC under the service's guard key (:mod:`kit.guard_key`)
   bound to the model, the key and the worker (:mod:`kit.serving.guard_files`);
2. reads every other worker's file in that folder (all workers of all instances sharing the registry and
   the guard key), size-capped, without following links, MAC checked before it is parsed strictly, and
   sums the buckets inside the window with its own (kept in memory: deleting files cannot blind a worker
   to its own traffic). A file that fails is ignored, reported (``/readyz``, the log,
   ``kit_canary_guard_rejected_files_total``) and never stops the guard. Files of dead workers are swept
   once nothing in them is inside a window;
3. decides (:func:`kit.serving.guard_stats.decide`, where the settings, buckets and merging live too): with
   at least ``min_requests`` on both sides, a canary whose 5xx rate is
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
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._types import JSONObject
from kit.errors import SigningKeyError
from kit.serving import guard_files as gf
from kit.serving.guard_stats import (
    SIDES,
    GuardSettings,
    SideStats,
    Verdict,
    bucket_of,
    decide,
    merge,
    parse_guard_settings,
)
from kit.signing import SigningKey

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.serving.metrics import Metrics
    from kit.serving.slots import ModelSlots

log = logging.getLogger(__name__)

class CanaryGuard:
    """One worker's part of the guard (see the module docstring). ``registry`` is the service's
    :class:`kit.registry.Registry`; ``slots`` its :class:`kit.serving.slots.ModelSlots`; ``key`` the service's
    guard key (:func:`kit.guard_key.load_or_create_guard_key`): it authenticates the window files and signs
    the guard's moves. Without it the worker judges on its own counts only and says so."""

    def __init__(self, settings: GuardSettings, registry: Registry, model: str, slots: ModelSlots,
                 metrics: Metrics | None = None, *,
                 key: SigningKey | None, key_error: str | None = None):
        from kit.guard_key import window_mac_key

        self.settings = settings
        self.registry = registry
        self.model = model
        self.slots = slots
        self.model_dir = Path(registry.root) / model
        self.folder = self.model_dir / "guard"
        self.worker = gf.worker_name(socket.gethostname(), os.getpid())
        self.key = key
        self._mac_key = window_mac_key(key) if key is not None else None
        self._key_error = key_error or (None if key is not None else "no guard key")
        self._slot_s = gf.slot_width(settings.window_s)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, int], list[Any]] = {}  # (side, slot start) -> [n, err, {bucket: count}]
        self._seq = 0  # this worker's file sequence (from the clock, in ms): only goes forward
        self._wrote = False  # this worker has a file in the current key's folder
        self._seen_seq: dict[str, int] = {}  # other workers' highest seq read under the current key
        self._good: set[str] = set()  # workers whose files verified (read first when there are many)
        self.rejected: dict[str, str] = {}  # file -> why, under the current key (what /readyz shows)
        self.rejected_total = 0
        self._swept = 0.0
        self._share_error: str | None = None
        self._sides: tuple[int | None, int | None] = (None, None)  # (production, canary) versions now
        self._key: str | None = None
        self._key_since = 0.0  # when this worker first saw the current key
        self.window: dict[str, SideStats] = {}
        self.last_decision: JSONObject | None = None
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
        slot = self._slot_s
        key = (side, int(time.time()) // slot * slot)
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
            if self._key is not None and self._wrote:
                gf.forget(self.model_dir, self._key, self.worker + ".json")  # that split is over: history now
            self._key, self._sides, self.window, self._key_since = key, (prod, canary), {}, now
            self._wrote, self._seen_seq, self.rejected, self._good = False, {}, {}, set()
        if key is None or key in self._decided:
            return None
        since = now - self.settings.window_s
        own = self._own_window(since)
        others = self._exchange(key, own, now) if self._mac_key is not None else []
        self.window = merge([own, *others], since)
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

    def _own_window(self, since: float) -> dict[str, list[gf.Slot]]:
        """This worker's slots inside the window (older ones dropped), per side, in time order."""
        with self._lock:
            for k in [k for k in self._buckets if k[1] < since]:
                del self._buckets[k]
            cells = sorted(self._buckets.items(), key=lambda kv: kv[0][1])
            own: dict[str, list[gf.Slot]] = {side: [] for side in SIDES}
            for (side, sec), (n, err, hist) in cells:
                own[side].append((sec, n, err, tuple(sorted(hist.items()))))
        return own

    def _exchange(self, key: str, own: dict[str, list[gf.Slot]], now: float) -> list[Mapping[str, Any]]:
        """Write this worker's file (when it has counts, or had a file), read and verify the others'."""
        assert self._mac_key is not None
        has_counts = any(own.values())
        name = self.worker + ".json"
        try:
            with gf.open_key_folder(self.model_dir, key, create=has_counts) as fd:
                if fd is None:
                    return []
                if has_counts or self._wrote:
                    self._seq = max(self._seq + 1, int(now * 1000))  # forward across restarts under one name too
                    gf.write_file(fd, name, gf.encode(self._mac_key, self.model, key, self.worker, self._seq, now,
                                                      self._slot_s, own))
                    self._wrote = True
                others = self._read_others(fd, key, name, now)
                self._share_error = None
                if now - self._swept >= self.settings.window_s:
                    self._sweep(fd, key, now)
                return others
        except gf.WindowFileRejected as exc:  # the folder itself: a link or not ours; judge on own counts
            self._reject(f"guard/{key}", exc)
            return []
        except OSError as exc:  # a read-only or unmounted registry: judge on own counts, say so once
            if self._share_error != str(exc):
                log.error("%s: canary guard cannot share its counts (judging this worker's alone): %s", self.model, exc)
            self._share_error = str(exc)
            return []

    def _read_others(self, fd: int, key: str, own_name: str, now: float) -> list[Mapping[str, Any]]:
        assert self._mac_key is not None
        names, skipped = gf.worker_files(fd, own_name, self._good)
        windows: list[Mapping[str, Any]] = []
        for name in names:
            worker = name[:-5]
            try:
                data, _ = gf.read_file(fd, name)
                wf = gf.decode(self._mac_key, self.model, key, worker, data, now)
                if wf.seq < self._seen_seq.get(worker, 0):
                    raise gf.WindowFileRejected("replay", f"{name} is older (seq {wf.seq}) than one already read "
                                                          f"(seq {self._seen_seq[worker]}): put back, not counted")
            except gf.WindowFileRejected as exc:
                self._reject(name, exc)
                continue
            self._seen_seq[worker] = wf.seq
            self._good.add(worker)
            self.rejected.pop(name, None)
            windows.append(wf.sides)
        if len(names) >= gf.MAX_FILES:
            self._reject(f"guard/{key}", gf.WindowFileRejected(
                "folder", f"more than {gf.MAX_FILES} worker files ({skipped} other names): only "
                          f"{gf.MAX_FILES} read, known workers first"))
        return windows

    def _sweep(self, fd: int, key: str, now: float) -> None:
        """Remove dead workers' files (nothing in them is inside a window any more), here and in old keys."""
        self._swept = now
        cutoff = now - self.settings.window_s - 10 * self.settings.interval_s
        gone = gf.sweep(fd, cutoff) + gf.sweep_old_keys(self.model_dir, key, cutoff)
        if gone:
            log.info("%s: canary guard swept %d stale window file(s) of workers that are gone", self.model, gone)

    def _reject(self, name: str, exc: gf.WindowFileRejected) -> None:
        """Ignore a file (or the folder): say so once per file and reason, count it, show it on /readyz."""
        why = f"{exc.reason}: {exc}"
        if self.rejected.get(name) == why:
            return
        if len(self.rejected) < 20 or name in self.rejected:
            self.rejected[name] = why
        self.rejected_total += 1
        log.warning("%s: canary guard ignored %s (not counted; the guard goes on): %s", self.model, name, why)
        if self._gauges is not None:
            self._gauges.rejected(exc.reason)

    def _act(self, verdict: Verdict, canary: int | None, prod: int | None, serial: int, key: str) -> Verdict | None:
        from kit.traffic import guard_stop

        assert canary is not None
        evidence = {**verdict.evidence, "reason": verdict.reason, "detail": verdict.detail, "canary_version": canary,
                    "production_version": prod, "aliases_serial": serial, "decided_by": self.worker}
        change = guard_stop(self.registry, self.model, canary, serial, evidence, **self._signer(guard_stop))
        self.last_decision = {**evidence, "ended": change is not None, "ts": time.time()}
        if change is None:  # another worker (or a person) moved the aliases first
            log.info("%s: canary guard judged v%d worse (%s) but the canary had already moved", self.model, canary,
                     verdict.detail)
            return None
        log.warning("%s: canary guard ended canary v%d: %s", self.model, canary, verdict.detail)
        if self._gauges is not None:
            self._gauges.decided(verdict.reason)
        return verdict

    def _signer(self, move: Callable[..., object]) -> dict[str, Any]:
        """``signer=`` the guard key, for a registry move that takes one (its authority is checked there)."""
        import inspect

        if self.key is None or "signer" not in inspect.signature(move).parameters:
            return {}
        return {"signer": self.key}

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
            change = guard_step(self.registry, self.model, canary, serial, nxt / 100, evidence,
                                **self._signer(guard_step))
        except Exception as exc:  # the gate refused the promotion (or the registry): say so, keep serving
            self.last_decision = {"step": "refused", "version": canary, "error": str(exc), "ts": time.time()}
            log.error("%s: canary guard could not promote v%d at 100%%: %s", self.model, canary, exc)
            return
        if change is not None:
            self.last_decision = {"step": change.action, "version": canary, "weight": nxt / 100, "ts": time.time()}
            log.info("%s: canary guard: v%d healthy for %gs, %s", self.model, canary, self.settings.hold_s,
                     change.describe())

    def status(self) -> JSONObject:
        """What /readyz shows under ``canary_guard``."""
        s = self.settings
        return {"enabled": s.enabled, "key": self._key, "error": self.error or self._key_error or self._share_error, "window_s": s.window_s,
                "min_requests": s.min_requests, "window": {side: st.describe() for side, st in self.window.items()},
                "guard_key": self.key.key_id if self.key is not None else None,
                "rejected_files": {"total": self.rejected_total, "now": dict(self.rejected)},
                "last_decision": self.last_decision or self._recorded_decision()}

    def _recorded_decision(self) -> JSONObject | None:
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


class _GuardMetrics:
    def __init__(self, metrics: Metrics, model: str):
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
        self.rejections = Counter("kit_canary_guard_rejected_files_total", "Window files (or folders) the guard "
                                  "ignored: unauthenticated, oversized, not a regular file, malformed, replayed.",
                                  ["model", "reason"], registry=reg)

    def window(self, stats: dict[str, SideStats]) -> None:
        for side, st in stats.items():
            self.requests.labels(self.model, side).set(st.requests)
            self.errors.labels(self.model, side).set(st.error_rate)
            self.p95.labels(self.model, side).set(st.p95() or 0.0)

    def decided(self, reason: str) -> None:
        self.decisions.labels(self.model, reason).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(self.model, reason).inc()


def make_guard(settings: GuardSettings | None, registry: Registry, model: str, slots: ModelSlots, metrics: Metrics,
               start: bool = True, service_dir: Path | None = None) -> CanaryGuard | None:
    """The worker's guard (started), or None when ``[canary_guard]`` is off. The service's guard key is loaded
    once per worker from ``service_dir`` (made there when missing)."""
    from kit.guard_key import load_or_create_guard_key

    if settings is None or not settings.enabled:
        return None
    key, key_error = None, None
    try:
        if service_dir is None:
            raise SigningKeyError("no service folder to keep the guard key in")
        key = load_or_create_guard_key(service_dir)
    except SigningKeyError as exc:  # judge on this worker's counts only, and say why on /readyz
        key_error = f"no guard key, so this worker neither shares nor reads window files: {exc}"
        log.error("%s: canary guard: %s", model, key_error)
    guard = CanaryGuard(settings, registry, model, slots, metrics, key=key, key_error=key_error)
    if start:
        guard.start()
    return guard


__all__ = ["CanaryGuard", "GuardSettings", "SideStats", "Verdict", "decide", "make_guard", "merge",
           "parse_guard_settings"]
