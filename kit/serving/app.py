"""The Flask app factory of a generated service.

``create_app(config)`` builds the app for one worker: it loads the production (and canary) versions
before the first request (so a worker only accepts connections once it can answer), starts the
hot-reload watcher, and wires routing, batching, auth, limits, metrics and one JSON log line per request.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from typing import Any

import orjson
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from kit.serving.config import ServiceConfig
from kit.serving.hooks import make_hooks
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
from kit.serving.security import ANONYMOUS, ApiKeys, Authenticator, Identity, JwtVerifier, RateLimiter, Unauthorized
from kit.serving.slots import ModelSlots

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

JSON = "application/json"
BINARY_ENV = "HTTP_" + BINARY_HEADER.upper().replace("-", "_")
_STATUS = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
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
    from kit.serving.config import service_keyring

    registry = registry or Registry(config.registry, require_gate=False, user=f"service:{config.name}",
                                    keyring=service_keyring(config))  # [trust] public_keys
    metrics = Metrics(metrics_dir)
    slots = ModelSlots(registry, config.model, device=config.device, check_env=config.check_env,
                       max_artifact_bytes=config.max_artifact_bytes,
                       batching=config.batching, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                       poll_interval=config.poll_interval, retry_max=config.retry_max, metrics=metrics)
    slots.refresh()  # the initial load, before this worker accepts a connection
    if watch:
        slots.start()
    hooks = make_hooks(config, registry, slots, metrics, start=watch)  # canary guard, traffic capture
    keys = ApiKeys(config.api_keys_sha256, config.keys_file)
    auth = Authenticator(keys, JwtVerifier(config.jwt) if config.jwt is not None else None)
    limiter = RateLimiter(config.rate_limit, config.rate_burst)
    model = config.model
    vh = config.version_header
    uh = config.user_header
    vh_env = "HTTP_" + vh.upper().replace("-", "_") if vh else "-"  # WSGI environ keys of the headers
    uh_env = "HTTP_" + uh.upper().replace("-", "_") if uh else "-"
    log_requests = config.access_log
    pid = os.getpid()

    app = Flask(f"kit.service.{config.name}")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["kit"] = slots
    app.extensions["kit.metrics"] = metrics
    app.extensions["kit.config"] = config
    app.extensions["kit.hooks"] = hooks

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
        if log_requests:
            access.info("request", extra={"kit": {
                "request_id": g.rid, "method": request.method, "path": request.path, "model": model,
                "version": g.version, "route": g.route, "status": resp.status_code,
                "latency_ms": round(seconds * 1000, 3), "batch": g.batch, "input_shape": g.shape}})
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        msg = exc.description or exc.name
        if exc.code == 413:
            msg = f"Request body too large: the limit is {config.max_body_bytes} bytes ([limits] max_body_bytes)."
        elif exc.code == 405:
            msg = f"Method {request.method} is not allowed on {request.path}."
            allowed = getattr(exc, "valid_methods", None) or ["GET"]
            return _error(msg, 405, {"Allow": ", ".join(sorted(allowed))})
        elif exc.code == 404:
            msg = f"No endpoint {request.path}; see /openapi.json."
        return _error(msg, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:  # a bug or a model failure, never a client's fault
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, g.get("rid"))
        return _error(f"Internal error ({type(exc).__name__}); see the service log, request id {g.get('rid')}.", 500)

    # ---- inference: a plain WSGI fast path in front of Flask (the hot path skips Flask's request
    # context, hooks and Request/Response objects; everything else goes through Flask as usual)
    def _refuse(environ: dict[str, Any]) -> tuple[tuple[int, str, dict[str, str]] | None, Identity]:
        """(refusal or None, the caller): API keys and/or JWTs ([auth]), then the rate limit."""
        try:
            who = auth.identify(environ.get("HTTP_X_API_KEY"), environ.get("HTTP_AUTHORIZATION"))
        except Unauthorized as exc:
            return (401, str(exc), {"WWW-Authenticate": exc.challenge}), ANONYMOUS
        if limiter.enabled:
            ok, wait = limiter.allow(who.client or f"addr:{environ.get('REMOTE_ADDR')}")
            if not ok:
                return (429, (f"Rate limit exceeded ({config.rate_limit:g} requests/s per client); "
                              f"retry in {wait:.2f}s."), {"Retry-After": str(max(1, round(wait + 0.5)))}), who
        return None, who

    def _read_body(environ: dict[str, Any]) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError as exc:
            raise RequestError("Content-Length is not a number.") from exc
        limit = config.max_body_bytes
        if length > limit:
            raise RequestError(f"Request body too large ({length} bytes): the limit is {limit} bytes "
                               "([limits] max_body_bytes).", 413)
        stream = environ["wsgi.input"]
        body = stream.read(length) if length >= 0 else stream.read(limit + 1)
        if len(body) > limit:
            raise RequestError(f"Request body too large: the limit is {limit} bytes ([limits] max_body_bytes).", 413)
        return bytes(body)

    def _infer(environ: dict[str, Any], start_response: Any, name: str | None, version: str | None) -> list[bytes]:
        t0 = time.perf_counter()
        rid = environ.get("HTTP_X_REQUEST_ID") or os.urandom(8).hex()
        route, slot, batch, shape = "rejected", None, 0, None
        inputs: Any = None
        outputs: Any = None
        headers = {"X-Request-Id": rid}
        ctype = JSON
        try:
            if environ["REQUEST_METHOD"] != "POST":
                headers["Allow"] = "POST"
                raise RequestError(f"Method {environ['REQUEST_METHOD']} is not allowed here; use POST.", 405)
            refused, who = _refuse(environ)
            if refused is not None:
                status, msg, extra = refused
                headers.update(extra)
                raise RequestError(msg, status)
            if name is not None and name != model:
                raise RequestError(f"This service serves model {model!r}, not {name[:64]!r}.", 404)
            body = _read_body(environ)
            state = slots.state
            if not state.ready:
                raise RequestError(f"Model {model!r} is not loaded yet ({_not_ready_reason()}).", 503)
            try:
                slot, route = choose(state, model=model, override=version or environ.get(vh_env),
                                     user=who.user or environ.get(uh_env))
            except RouteError as exc:
                raise RequestError(str(exc), exc.status) from exc
            if version:
                route = "path"
            headers[VERSION_HEADER_OUT] = str(slot.version)
            if name is None:
                inputs, unbatched = parse_predict(body, slot.signature, config.max_batch)
                shape = list(inputs[0].shape)
                outputs, batch = slot.infer(inputs)
                data = predict_response(outputs, slot.signature, unbatched, model, slot.version)
            else:
                inputs, doc = parse_v2_infer(body, environ.get(BINARY_ENV), slot.signature, config.max_batch)
                shape = list(inputs[0].shape)
                outputs, batch = slot.infer(inputs)
                data, header_len = v2_response(outputs, slot.signature, doc, model, slot.version)
                if header_len is not None:
                    headers[BINARY_HEADER] = str(header_len)
                    ctype = "application/octet-stream"
            status = 200
        except RequestError as exc:
            status = exc.status
            data = orjson.dumps({"error": str(exc)})
        except Exception as exc:  # a bug or a model failure, never a client's fault
            log.exception("unhandled error on %s (request %s)", environ.get("PATH_INFO"), rid)
            status = 500
            data = orjson.dumps({"error": f"Internal error ({type(exc).__name__}); see the service log, "
                                          f"request id {rid}."})
        version_served = slot.version if slot is not None else None
        seconds = time.perf_counter() - t0
        metrics.observe(model, version_served, route, status, seconds, batch)
        hooks.finished(rid, version_served, status, seconds, slot.signature if slot is not None else None,
                       inputs, outputs)
        if log_requests:
            access.info("request", extra={"kit": {
                "request_id": rid, "method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO"),
                "model": model, "version": version_served, "route": route, "status": status,
                "latency_ms": round(seconds * 1000, 3), "batch": batch, "input_shape": shape}})
        start_response(_STATUS[status], [("Content-Type", ctype), ("Content-Length", str(len(data))),
                                         *headers.items()])
        return [data]

    flask_wsgi = app.wsgi_app

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/predict":
            return _infer(environ, start_response, None, None)
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path.split("/")
            if len(parts) == 5:
                return _infer(environ, start_response, parts[3], None)
            if len(parts) == 7 and parts[4] == "versions":
                return _infer(environ, start_response, parts[3], parts[5])
        return flask_wsgi(environ, start_response)

    app.wsgi_app = wsgi  # type: ignore[method-assign]

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
            "reload_error": slots.last_error, "canary_guard": hooks.guard_status(),
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
        if slot is None:  # ready implies a production slot; say so rather than fail if that ever changes
            return _error(f"Model {model!r} has no production version loaded.", 503)
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
        return _json(build_openapi(config.name, model, sig, auth=auth.enabled, jwt=config.jwt is not None,
                                   max_batch=config.max_batch, version_header=vh,
                                   user_header=uh))

    if slots.state.ready:
        metrics.served(model, slots.state)
    else:
        log.error("%s: not ready at start-up: %s", model, _not_ready_reason())
    return app


__all__ = ["create_app"]
