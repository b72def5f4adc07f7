"""The ASGI app of a generated service (``[service] engine = "asgi"``), run by
:class:`kit.serving.worker.KitUvicornWorker` under gunicorn.

``create_asgi_app(config)`` builds one worker's app: it loads the production (and canary) versions
before the worker accepts a connection, starts the hot-reload watcher and the inference thread, and
dispatches: ``POST /predict`` and v2 infer go to the async inference handler
(:mod:`kit.serving.handlers`), everything else to the control routes (:mod:`kit.serving.control`).
Every request ends in :func:`kit.serving.handlers.log_request` (one JSON line; metrics for inference).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kit import backends
from kit.serving import control
from kit.serving.config import ServiceConfig, worker_plan
from kit.serving.engine import InferenceEngine
from kit.serving.handlers import Outcome, Service, log_request, request_id, run_infer
from kit.serving.hooks import make_hooks
from kit.serving.http import Receive, Scope, Send, respond_to, send_response
from kit.serving.metrics import Metrics
from kit.serving.security import ApiKeys, Authenticator, JwtVerifier, RateLimiter
from kit.serving.slots import ModelSlots

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.serving.testing import AsgiTestClient

log = logging.getLogger("kit.serving.app")


def _infer_target(path: str) -> tuple[bool, str | None, str | None]:
    """(is an inference path, model name, version) for /predict and v2 infer paths."""
    if path == "/predict":
        return True, None, None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path.split("/")
        if len(parts) == 5:
            return True, parts[3], None
        if len(parts) == 7 and parts[4] == "versions":
            return True, parts[3], parts[5]
    return False, None, None


class KitAsgiApp:
    """One worker's ASGI application. ``service`` holds the state (slots, metrics, config, engine)."""

    def __init__(self, service: Service):
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets: not served (uvicorn answers 403 when the app does not accept)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        svc = self.service
        path = scope["path"]
        is_infer, name, version = _infer_target(path)
        if is_infer:
            resp, out = await run_infer(svc, scope, receive, name, version)
            if resp is None:  # the client went away (or its body timed out): nothing to answer
                log_request(svc, scope, out, 408, time.perf_counter() - t0, inference=True)
                return
        else:
            out = Outcome(request_id(scope))
            try:
                resp = control.answer(svc, scope["method"], path)
            except Exception as exc:
                resp = respond_to(exc, out.rid, f"{scope['method']} {path}")
            resp.headers["X-Request-Id"] = out.rid
        await send_response(send, resp)
        log_request(svc, scope, out, resp.status, time.perf_counter() - t0, inference=is_infer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def test_client(self) -> AsgiTestClient:
        """A synchronous client without a server (:class:`kit.serving.testing.AsgiTestClient`)."""
        from kit.serving.testing import AsgiTestClient

        return AsgiTestClient(self)

    def close(self) -> None:
        """Stop the watcher and the inference thread (after the queued forward passes)."""
        self.service.slots.stop()
        self.service.engine.stop()
        if self.service.hooks is not None:
            self.service.hooks.close()


def create_asgi_app(config: ServiceConfig, *, registry: Registry | None = None, metrics_dir: str | None = None,
                    watch: bool = True) -> KitAsgiApp:
    """Build the ASGI app of one service worker

    Parameters
    ----------
    config : the resolved service settings (:func:`kit.serving.load_service_config`).
    registry : a :class:`kit.registry.Registry`; default ``Registry(config.registry)``.
    metrics_dir : ``PROMETHEUS_MULTIPROC_DIR`` under gunicorn (multiprocess metrics), else None.
    watch : start the hot-reload watcher thread (tests may drive ``app.service.slots.refresh()``).
    """
    from kit.registry import Registry
    from kit.registry.cache import default_cache_dir
    from kit.serving.config import service_keyring

    registry = registry or Registry(config.registry, require_gate=False, user=f"service:{config.name}",
                                    keyring=service_keyring(config),  # [trust] public_keys
                                    cache_dir=default_cache_dir(config.name))  # the service's own verified cache
    metrics = Metrics(metrics_dir)
    backend = config.backend
    metrics.serving_backend(config.model, backend)
    threads = worker_plan(config)[1]  # workers x threads <= cores: torch's (set in post_fork) or onnxruntime's
    slots = ModelSlots(registry, config.model, device=config.device, backend=backend, threads=threads,
                       check_env=config.check_env, max_artifact_bytes=config.max_artifact_bytes,
                       max_tensor_bytes=config.max_tensor_bytes,
                       batching=config.batching, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                       poll_interval=config.poll_interval, retry_max=config.retry_max, metrics=metrics)
    slots.refresh()  # the initial load, before this worker accepts a connection
    if watch:
        slots.start()
    engine = InferenceEngine(max_batch=config.max_batch if config.batching else 1, max_wait_ms=config.max_wait_ms,
                             torch_threads=_torch_threads(backend), name=f"kit-infer-{config.model}")
    auth = Authenticator(ApiKeys(config.api_keys_sha256, config.keys_file),
                         JwtVerifier(config.jwt) if config.jwt is not None else None)
    svc = Service(config=config, slots=slots, metrics=metrics, auth=auth,
                  limiter=RateLimiter(config.rate_limit, config.rate_burst), engine=engine,
                  hooks=make_hooks(config, registry, slots, metrics, start=watch))  # canary guard, capture
    if slots.state.ready:
        metrics.served(config.model, slots.state)
    else:
        log.error("%s: not ready at start-up: %s", config.model, svc.not_ready_reason())
    return KitAsgiApp(svc)


def _torch_threads(backend: str) -> int:
    """The inference thread's torch thread count: the worker's (post_fork set it), on the torch backend only.
    An onnxruntime worker never imports torch; its session has its own intra-op pool (``threads``)."""
    if backends.get(backend).runtime != "torch":
        return 0
    import torch

    return int(torch.get_num_threads())


__all__ = ["KitAsgiApp", "create_asgi_app"]
