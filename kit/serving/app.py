"""The Flask app factory of a generated service.

``create_app(config)`` builds the app for one worker: it loads the production (and canary) versions
before the first request (so a worker only accepts connections once it can answer), starts the
hot-reload watcher, and wires routing, batching, auth, limits, metrics and one JSON log line per request.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from kit.errors import KitError
from kit.serving.config import ServiceConfig
from kit.serving.logs import ACCESS_LOGGER
from kit.serving.metrics import Metrics
from kit.serving.openapi import build_openapi
from kit.serving.protocol import (
    BINARY_HEADER,
    RequestError,
    parse_predict,
    parse_v2_infer,
    predict_response,
    v2_metadata,
    v2_response,
)
from kit.serving.router import RouteError, choose
from kit.serving.security import ApiKeys, RateLimiter
from kit.serving.slots import ModelSlots

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

JSON = "application/json"
VERSION_HEADER_OUT = "X-Kit-Model-Version"


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status=status, mimetype=JSON,
                    headers=headers)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


def create_app(config: ServiceConfig, *, registry: Any = None, metrics_dir: str | None = None,
               watch: bool = True) -> Flask:
    """Build the WSGI app of one service worker.

    Parameters
    ----------
    config : the resolved service settings (:func:`kit.serving.load_service_config`).
    registry : a :class:`kit.registry.Registry`; default ``Registry(config.registry)``.
    metrics_dir : ``PROMETHEUS_MULTIPROC_DIR`` under gunicorn (multiprocess metrics), else None.
    watch : start the hot-reload watcher thread (tests may drive ``app.extensions["kit"].refresh()``).
    """
    from kit.registry import Registry

    registry = registry or Registry(config.registry, require_gate=False, user=f"service:{config.name}")
    metrics = Metrics(metrics_dir)
    slots = ModelSlots(registry, config.model, device=config.device, check_env=config.check_env,
                       batching=config.batching, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                       poll_interval=config.poll_interval, retry_max=config.retry_max, metrics=metrics)
    slots.refresh()  # the initial load, before this worker accepts a connection
    if watch:
        slots.start()
    keys = ApiKeys(config.api_keys_sha256, config.keys_file)
    limiter = RateLimiter(config.rate_limit, config.rate_burst)
    model = config.model
    vh = config.version_header
    uh = config.user_header
    log_requests = config.access_log
    pid = os.getpid()

    app = Flask(f"kit.service.{config.name}")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["kit"] = slots
    app.extensions["kit.metrics"] = metrics
    app.extensions["kit.config"] = config

    # ---- per-request bookkeeping: one JSON log line and the metrics
    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()
        g.rid = request.headers.get("X-Request-Id") or os.urandom(8).hex()
        g.version = None
        g.route = None
        g.batch = 0
        g.shape = None

    @app.after_request
    def _finish(resp: Response) -> Response:
        t0 = getattr(g, "t0", None)
        if t0 is None:
            return resp
        seconds = time.perf_counter() - t0
        resp.headers["X-Request-Id"] = g.rid
        if g.route is not None:  # an inference endpoint
            if g.version is not None:
                resp.headers[VERSION_HEADER_OUT] = str(g.version)
            metrics.observe(model, g.version, g.route, resp.status_code, seconds, g.batch)
        if log_requests:
            access.info("request", extra={"kit": {
                "request_id": g.rid, "method": request.method, "path": request.path, "model": model,
                "version": g.version, "route": g.route, "status": resp.status_code,
                "latency_ms": round(seconds * 1000, 3), "batch": g.batch, "input_shape": g.shape}})
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if g.get("route") is None and (request.path == "/predict" or request.path.endswith("/infer")):
            g.route = "rejected"  # count refused inference requests too
        msg = exc.description or exc.name
        if exc.code == 413:
            msg = f"Request body too large: the limit is {config.max_body_bytes} bytes ([limits] max_body_bytes)."
        elif exc.code == 405:
            msg = f"Method {request.method} is not allowed on {request.path}."
        elif exc.code == 404:
            msg = f"No endpoint {request.path}; see /openapi.json."
        return _error(msg, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:  # a bug or a model failure, never a client's fault
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, g.get("rid"))
        return _error(f"Internal error ({type(exc).__name__}); see the service log, request id {g.get('rid')}.", 500)

    # ---- inference
    def _gate() -> Response | None:
        """Auth and rate limit; a response when refused."""
        g.route = "rejected"
        client = None
        if keys.enabled:
            presented = request.headers.get("X-API-Key")
            auth = request.headers.get("Authorization", "")
            if not presented and auth[:7].lower() == "bearer ":
                presented = auth[7:].strip()
            if not keys.check(presented):
                return _error("Missing or unknown API key: send it as 'X-API-Key: KEY' or "
                              "'Authorization: Bearer KEY'.", 401, {"WWW-Authenticate": "Bearer"})
            client = "key:" + presented[:8] if presented else None
        if limiter.enabled:
            ok, wait = limiter.allow(client or f"addr:{request.remote_addr}")
            if not ok:
                return _error(f"Rate limit exceeded ({config.rate_limit:g} requests/s per client); "
                              f"retry in {wait:.2f}s.", 429, {"Retry-After": str(max(1, round(wait + 0.5)))})
        return None

    def _route(override: str | None = None) -> Any:
        state = slots.state
        if not state.ready:
            raise RequestError(f"Model {model!r} is not loaded yet ({_not_ready_reason()}).", 503)
        try:
            slot, reason = choose(state, model=model, override=override or (request.headers.get(vh) if vh else None),
                                  user=request.headers.get(uh) if uh else None)
        except RouteError as exc:
            raise RequestError(str(exc), exc.status) from exc
        g.route = "path" if override else reason
        g.version = slot.version
        return slot

    def _body() -> bytes:
        return request.get_data(cache=False)

    @app.post("/predict")
    def predict() -> Response:
        refused = _gate()
        if refused is not None:
            return refused
        try:
            body = _body()
            slot = _route()
            inputs, unbatched = parse_predict(body, slot.signature, config.max_batch)
            g.shape = list(inputs[0].shape)
            outputs, g.batch = slot.infer(inputs)
            return Response(predict_response(outputs, slot.signature, unbatched, model, slot.version),
                            mimetype=JSON)
        except RequestError as exc:
            return _error(str(exc), exc.status)

    def _v2_infer(name: str, version: str | None) -> Response:
        refused = _gate()
        if refused is not None:
            return refused
        try:
            if name != model:
                raise RequestError(f"This service serves model {model!r}, not {name[:64]!r}.", 404)
            body = _body()
            slot = _route(version)
            inputs, doc = parse_v2_infer(body, request.headers.get(BINARY_HEADER), slot.signature, config.max_batch)
            g.shape = list(inputs[0].shape)
            outputs, g.batch = slot.infer(inputs)
            data, header_len = v2_response(outputs, slot.signature, doc, model, slot.version)
            if header_len is None:
                return Response(data, mimetype=JSON)
            return Response(data, mimetype="application/octet-stream", headers={BINARY_HEADER: str(header_len)})
        except RequestError as exc:
            return _error(str(exc), exc.status)

    @app.post("/v2/models/<name>/infer")
    def v2_infer(name: str) -> Response:
        return _v2_infer(name, None)

    @app.post("/v2/models/<name>/versions/<version>/infer")
    def v2_infer_version(name: str, version: str) -> Response:
        return _v2_infer(name, version)

    # ---- health, metadata, metrics
    def _not_ready_reason() -> str:
        err = slots.last_error
        return err["error"] if err else "still loading"

    @app.get("/healthz")
    @app.get("/v2/health/live")
    def healthz() -> Response:
        return _json({"status": "alive", "pid": pid})

    @app.get("/readyz")
    def readyz() -> Response:
        state = slots.state
        body: dict[str, Any] = {
            "model": model, "ready": state.ready, "pid": pid,
            "production": state.production.describe() if state.production else None,
            "canary": state.canary.describe() if state.canary else None, "canary_weight": state.weight,
            "aliases_serial": state.serial, "last_reload": slots.last_reload, "reloads": slots.reloads,
            "reload_error": slots.last_error,
        }
        if not state.ready:
            body["status"] = f"not ready: {_not_ready_reason()}"
            return _json(body, 503)
        # A failed reload leaves the old version serving: still ready, but say so (load balancers keep us).
        body["status"] = "degraded: last reload failed, serving the previous versions" if slots.last_error else "ok"
        return _json(body, 200)

    @app.get("/v2/health/ready")
    def v2_ready() -> Response:
        return _json({"ready": slots.state.ready}, 200 if slots.state.ready else 503)

    @app.get("/v2")
    def v2_server() -> Response:
        import kit

        return _json({"name": "kit", "version": getattr(kit, "__version__", "0"),
                      "extensions": ["binary_tensor_data"]})

    def _meta(name: str, version: str | None) -> Response:
        state = slots.state
        if name != model:
            return _error(f"This service serves model {model!r}, not {name[:64]!r}.", 404)
        if not state.ready:
            return _error(f"Model {model!r} is not loaded yet ({_not_ready_reason()}).", 503)
        served = [s.version for s in state.slots()]
        slot = state.production
        if version is not None:
            match = [s for s in state.slots() if str(s.version) == version]
            if not match:
                return _error(f"Version {version[:12]!r} of {model!r} is not served here (serving {served}).", 404)
            slot = match[0]
        return _json(v2_metadata(model, slot.signature, served))

    @app.get("/v2/models/<name>")
    def v2_model(name: str) -> Response:
        return _meta(name, None)

    @app.get("/v2/models/<name>/versions/<version>")
    def v2_model_version(name: str, version: str) -> Response:
        return _meta(name, version)

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def v2_model_ready(name: str, version: str | None = None) -> Response:
        if name != model:
            return _error(f"This service serves model {model!r}, not {name[:64]!r}.", 404)
        state = slots.state
        ok = state.ready and (version is None or any(str(s.version) == version for s in state.slots()))
        return _json({"name": model, "ready": ok}, 200 if ok else 400)

    @app.get("/v1/models")
    def v1_models() -> Response:
        state = slots.state
        return _json({"models": [{
            "name": model,
            "production": state.production.describe() if state.production else None,
            "canary": state.canary.describe() if state.canary else None,
            "canary_weight": state.weight, "aliases_serial": state.serial,
            "signature": state.production.signature.to_dict() if state.production else None,
            "routing": {"version_header": vh or None, "user_header": uh or None},
        }]})

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), mimetype=None, content_type=metrics.content_type)

    @app.get("/openapi.json")
    def openapi() -> Response:
        state = slots.state
        sig = state.production.signature if state.production else None
        return _json(build_openapi(config.name, model, sig, auth=keys.enabled, version_header=vh,
                                   user_header=uh))

    if slots.state.ready:
        metrics.served(model, slots.state)
    else:
        log.error("%s: not ready at start-up: %s", model, _not_ready_reason())
    return app


__all__ = ["create_app", "KitError"]
