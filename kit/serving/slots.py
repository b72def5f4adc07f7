"""Model slots and the hot-reload watcher.

Each worker holds one immutable :class:`ServingState` (production slot, canary slot, canary weight)
and replaces it with a single reference assignment, which is atomic: a request reads ``slots.state``
once and serves from that snapshot to the end. A watcher thread stats ``aliases.json`` (cheap) every
``poll_interval`` seconds; on a change it loads any new version off the request path, through
:meth:`kit.registry.Registry.load` (sha256 of every file, environment fingerprint) on the service's
backend (:mod:`kit.backends.serving`: torch or onnxruntime, numpy in and out either way) and
:meth:`LoadedModel.check_reference` (warm-up plus the stored reference output), and only then swaps.
On any failure the old state keeps serving; the failure is kept in :attr:`ModelSlots.last_error`
(shown by ``/readyz``), logged, counted in the metrics, and retried with backoff.

A worker with nothing to keep (a fresh one: started, or restarted after an OOM kill) whose versions cannot
all be loaded (the cache folder full or read-only, a program refused) falls back rather than answer
nothing: production without its canary, else the newest loadable previous production. ``/readyz`` shows
it under ``reload_error.fallback`` (what serves, what was wanted, why) until a retry loads the wanted state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kit._types import JSONObject
from kit.backends.serving import Forward, load_for_serving, warm_up
from kit.errors import KitError, ServingError
from kit.serving.protocol import CompiledSignature, compile_signature

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.registry.loaded import LoadedModel
    from kit.registry.records import Aliases
    from kit.serving.metrics import Metrics
    from kit.signature import Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One loaded, verified version and the callable that serves it."""

    version: int
    sha256: str
    loaded: LoadedModel
    signature: Signature
    forward: Forward  # batched numpy arrays in, batched numpy arrays out
    max_batch: int  # rows per forward pass (1: batching off); the inference thread batches up to it
    load_seconds: float
    device: str
    wire: CompiledSignature  # the signature prepared for the request path, once per loaded version
    backend: str = "torch"  # "torch" | "onnxruntime"

    def describe(self) -> JSONObject:
        return {"version": self.version, "sha256": self.sha256, "load_seconds": round(self.load_seconds, 3),
                "device": self.device, "backend": self.backend, "signed_by": getattr(self.loaded, "signed_by", None)}


@dataclass(frozen=True)
class ServingState:
    production: Slot | None = None
    canary: Slot | None = None
    weight: float = 0.0
    serial: int = -1

    @property
    def ready(self) -> bool:
        return self.production is not None

    def slots(self) -> list[Slot]:
        return [s for s in (self.production, self.canary) if s is not None]


class ModelSlots:
    """The versions one worker serves for one model, kept in step with ``aliases.json``."""

    def __init__(self, registry: Registry, model: str, *, device: str = "cpu", backend: str = "torch", threads: int = 0,
                 check_env: bool = True, max_artifact_bytes: int | None = None, max_tensor_bytes: int = 0,
                 batching: bool = True, max_batch: int = 64, max_wait_ms: float = 0.0,
                 poll_interval: float = 0.5, retry_max: float = 30.0, metrics: Metrics | None = None):
        self.registry = registry
        self.model = model
        self.device = device
        self.backend = backend
        self.threads = threads  # onnxruntime's intra-op threads (the worker plan's torch_threads; 0: its default)
        self.check_env = check_env
        self.max_artifact_bytes = max_artifact_bytes
        self.max_tensor_bytes = max_tensor_bytes
        self.batching = batching
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.poll_interval = poll_interval
        self.retry_max = retry_max
        self.metrics = metrics
        self.state = ServingState()
        self.last_error: JSONObject | None = None
        self.last_reload: JSONObject | None = None
        self.fallback: JSONObject | None = None  # set while serving less than aliases.json asks (see above)
        self._wanted: Aliases | None = None  # the aliases the last _apply tried to serve
        self.reloads = {"success": 0, "failure": 0}
        self._stat_key: tuple[int, int, int] | None | bool = False  # False: never looked
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()  # one refresh at a time (watcher vs. explicit calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the watcher
    def start(self) -> None:
        """Start the background watcher (daemon thread; one per worker)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=f"kit-watch-{self.model}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.refresh()
            except Exception:  # never let the watcher die; the next poll retries
                log.exception("reload watcher error for %s", self.model)

    # ---- one poll
    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.registry.aliases_path(self.model))
        except OSError:  # missing, or the registry is unreachable: _apply says which
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _check_reachable(self) -> None:
        """Fail clearly when the registry folder itself is gone (an unmounted or unreachable share)."""
        root = self.registry.root
        try:
            os.stat(root)
            os.listdir(root)
        except OSError as exc:
            serving = self.state.production.version if self.state.production else None
            still = f"still serving version {serving}" if serving is not None else "nothing loaded yet"
            raise ServingError(
                f"The registry {root} is unreachable ({type(exc).__name__}: {exc.strerror or exc}); {still}. "
                "Check the shared filesystem's mount (docs/fleet.md); the service retries on its own."
            ) from exc

    def refresh(self, force: bool = False) -> bool:
        """Follow ``aliases.json`` once. Returns True when the served state changed."""
        with self._lock:
            key = self._stat()
            retry = self.last_error is not None and time.monotonic() >= self._retry_at
            if key == self._stat_key and not force and not retry:
                return False
            self._stat_key = key
            try:
                return self._apply()
            except Exception as exc:  # any failure: keep serving the old state
                self._failed(exc)
                if self.state.production is None and self._wanted is not None:
                    return self._fall_back(self._wanted, exc)
                return False

    def _apply(self) -> bool:
        self._check_reachable()
        # the newest signed move record, verified once against [trust] (or a guard key it delegated), never
        # older than one this worker followed: a refusal keeps the served state and /readyz says why
        aliases = self.registry.aliases(self.model)
        self._wanted = aliases
        cur = self.state
        if aliases.production is None:
            if cur.production is None:
                raise ServingError(f"Model {self.model!r} has no production version in "
                                   f"{self.registry.aliases_path(self.model)}. Promote one: "
                                   f"`kit promote {self.model}@N`.")
            raise ServingError(f"aliases.json of {self.model!r} names no production version any more; "
                               f"still serving {cur.production.version}.")
        have = {s.version: s for s in cur.slots()}
        want = [aliases.production] + ([aliases.canary] if aliases.canary is not None else [])
        loaded = dict(have)
        fresh = []
        for v in want:
            if v not in loaded:
                loaded[v] = self._load(v)
                fresh.append(v)
            self._check_artifact(aliases, v, loaded[v])
        new = ServingState(
            production=loaded[aliases.production],
            canary=loaded[aliases.canary] if aliases.canary is not None else None,
            weight=aliases.canary_weight if aliases.canary is not None else 0.0,
            serial=aliases.serial,
        )
        changed = (new.production, new.canary, new.weight) != (cur.production, cur.canary, cur.weight)
        self.state = new  # the atomic swap
        self._failures = 0
        if self.last_error is not None:
            log.info("%s: reload recovered (was: %s)", self.model, self.last_error.get("error"))
        self.last_error = None
        self.fallback = None
        if fresh or changed:
            self.last_reload = {"serial": aliases.serial, "production": aliases.production,
                                "canary": aliases.canary, "weight": new.weight, "loaded": fresh,
                                "at": time.time()}
            self.reloads["success"] += 1
            if self.metrics is not None:
                self.metrics.reload(self.model, "success")
                self.metrics.served(self.model, new)
            log.info("%s: serving production %s, canary %s (weight %.3g); loaded %s", self.model,
                     aliases.production, aliases.canary, new.weight, fresh or "nothing new")
        return changed

    def _check_artifact(self, aliases: Aliases, v: int, slot: Slot) -> None:
        signed = aliases.artifacts.get(str(v))
        if signed and slot.sha256 != signed:  # the record names the artifact it moved traffic to
            raise ServingError(f"{self.model}@{v} has artifact sha256 {slot.sha256[:12]}, but move record "
                               f"{aliases.serial} points at {signed[:12]}: not the version that was moved to. "
                               "Restore the version, or move again.")

    def _fall_back(self, aliases: Aliases, exc: BaseException) -> bool:
        """Nothing served and the wanted state failed: serve production alone, else the newest previous
        production that loads (each checked as any load is). Returns True when something now serves."""
        for v in [aliases.production, *reversed(aliases.previous)]:
            if v is None:
                continue
            try:
                slot = self._load(v)
                self._check_artifact(aliases, v, slot)
            except Exception as again:  # noqa: BLE001  (each candidate's failure is logged; the next is tried)
                log.error("%s: fallback to version %s failed too: %s", self.model, v, again)
                continue
            self.state = ServingState(production=slot, serial=aliases.serial)
            why = f"{type(exc).__name__}: {exc}"
            self.fallback = {"serving": v, "wanted": {"production": aliases.production, "canary": aliases.canary},
                             "why": why, "at": time.time()}
            if self.last_error is not None:
                self.last_error["fallback"] = self.fallback
            if self.metrics is not None:
                self.metrics.served(self.model, self.state)
            log.error("%s: FALLBACK serving version %s instead of production %s, canary %s: %s", self.model, v,
                      aliases.production, aliases.canary, why)
            return True
        return False

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        backoff = min(self.retry_max, self.poll_interval * 2 ** min(self._failures, 10))
        self._retry_at = time.monotonic() + backoff
        kind = type(exc).__name__
        self.last_error = {"error": f"{kind}: {exc}", "at": time.time(), "attempts": self._failures,
                           "retry_in_s": round(backoff, 2)}
        if self.fallback is not None:  # still serving less than wanted: keep saying so
            self.last_error["fallback"] = self.fallback
        self.reloads["failure"] += 1
        if self.metrics is not None:
            self.metrics.reload(self.model, "failure")
        serving = self.state.production.version if self.state.production else None
        log.error("%s: reload failed, still serving %s: %s: %s", self.model, serving, kind, exc,
                  exc_info=not isinstance(exc, KitError))

    # ---- loading one version (off the request path)
    def _load(self, version: int) -> Slot:
        t0 = time.perf_counter()
        loaded, forward = load_for_serving(self.registry, self.model, version, backend=self.backend,
                                           device=self.device, threads=self.threads, check_env=self.check_env,
                                           max_artifact_bytes=self.max_artifact_bytes,
                                           max_tensor_bytes=self.max_tensor_bytes)
        sig = loaded.signature
        max_batch = max(1, min(self.max_batch, sig.max_batch))
        warm_up(forward, loaded, max_batch)  # the largest batch too: no first-call cost on the request path
        mv = loaded.version
        slot = Slot(version=mv.version, sha256=mv.artifact_sha256, loaded=loaded, signature=sig, forward=forward,
                    max_batch=max_batch if self.batching else 1, load_seconds=time.perf_counter() - t0,
                    device=self.device, wire=compile_signature(sig), backend=self.backend)
        log.info("%s@%d loaded and checked in %.2fs (sha256 %s, %s, %s)", self.model, mv.version,
                 slot.load_seconds, mv.short_sha, self.backend, self.device)
        return slot
