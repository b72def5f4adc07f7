"""The control routes of the ASGI engine: health, readiness, v2 metadata, /v1/models, metrics, OpenAPI.

They are plain functions of the worker's :class:`kit.serving.handlers.Service` that return a
:class:`kit.serving.http.Response`; none reads a body, none runs a forward pass, and all are cheap
(the OpenAPI document is built once per production version), so they run on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kit._types import JSONObject
from kit.serving.handlers import Service
from kit.serving.http import MethodNotAllowed, NotReady, Response
from kit.serving.openapi import build_openapi
from kit.serving.protocol import v2_metadata
from kit.serving.router import RouteError

if TYPE_CHECKING:
    from kit.serving.slots import Slot

Route = Callable[[Service, list[str]], Response]


def healthz(svc: Service, _: list[str]) -> Response:
    return Response.json({"status": "alive", "pid": svc.pid})


def readyz(svc: Service, _: list[str]) -> Response:
    state, slots = svc.slots.state, svc.slots
    body: JSONObject = {
        "model": svc.model, "backend": svc.config.backend, "ready": state.ready, "pid": svc.pid,
        "production": state.production.describe() if state.production else None,
        "canary": state.canary.describe() if state.canary else None, "canary_weight": state.weight,
        "aliases_serial": state.serial, "last_reload": slots.last_reload, "reloads": slots.reloads,
        "reload_error": slots.last_error,
        "canary_guard": svc.hooks.guard_status() if svc.hooks is not None else {"enabled": False},
        "metrics": svc.metrics.status(),
    }
    if not state.ready:
        body["status"] = f"not ready: {svc.not_ready_reason()}"
        return Response.json(body, 503)
    # A failed reload leaves the old version serving: still ready, but say so (load balancers keep us).
    body["status"] = "degraded: last reload failed, serving the previous versions" if slots.last_error else "ok"
    return Response.json(body, 200)


def v2_ready(svc: Service, _: list[str]) -> Response:
    ready = svc.slots.state.ready
    return Response.json({"ready": ready}, 200 if ready else 503)


def v2_server(svc: Service, _: list[str]) -> Response:
    from kit._version import __version__

    return Response.json({"name": "kit", "version": __version__,
                          "extensions": ["binary_tensor_data"]})


def _check_model(svc: Service, name: str) -> None:
    if name != svc.model:
        raise RouteError(f"This service serves model {svc.model!r}, not {name[:64]!r}.")


def v2_model(svc: Service, parts: list[str]) -> Response:
    """``/v2/models/<name>`` and ``/v2/models/<name>/versions/<version>``."""
    name, version = parts[3], parts[5] if len(parts) == 6 else None
    _check_model(svc, name)
    state = svc.slots.state
    if not state.ready or state.production is None:
        raise NotReady(f"Model {svc.model!r} is not loaded yet ({svc.not_ready_reason()}).")
    served = [s.version for s in state.slots()]
    slot = state.production
    if version is not None:
        match = [s for s in state.slots() if str(s.version) == version]
        if not match:
            raise RouteError(f"Version {version[:12]!r} of {svc.model!r} is not served here (serving {served}).")
        slot = match[0]
    return Response.json(v2_metadata(svc.model, slot.signature, served, slot.backend))


def v2_model_ready(svc: Service, parts: list[str]) -> Response:
    """``/v2/models/<name>/ready`` and ``/v2/models/<name>/versions/<version>/ready``."""
    name, version = parts[3], parts[5] if len(parts) == 7 else None
    _check_model(svc, name)
    state = svc.slots.state
    ok = state.ready and (version is None or any(str(s.version) == version for s in state.slots()))
    return Response.json({"name": svc.model, "ready": ok}, 200 if ok else 400)


def v1_models(svc: Service, _: list[str]) -> Response:
    state = svc.slots.state
    return Response.json({"models": [{
        "name": svc.model,
        "production": state.production.describe() if state.production else None,
        "canary": state.canary.describe() if state.canary else None,
        "canary_weight": state.weight, "aliases_serial": state.serial,
        "signature": state.production.signature.to_dict() if state.production else None,
        "routing": {"version_header": svc.config.version_header or None,
                    "user_header": svc.config.user_header or None},
    }]})


def metrics(svc: Service, _: list[str]) -> Response:
    return Response(200, svc.metrics.render(), svc.metrics.content_type.encode())


_openapi_cache: dict[int, tuple[Slot | None, bytes]] = {}


def openapi(svc: Service, _: list[str]) -> Response:
    prod = svc.slots.state.production
    key = id(svc) ^ id(prod)
    hit = _openapi_cache.get(key)
    if hit is None or hit[0] is not prod:
        cfg = svc.config
        doc = build_openapi(cfg.name, svc.model, prod.signature if prod else None, auth=svc.auth.enabled,
                            jwt=cfg.jwt is not None, max_batch=cfg.max_batch, version_header=cfg.version_header,
                            user_header=cfg.user_header)
        hit = (prod, Response.json(doc).body)
        _openapi_cache.clear()
        _openapi_cache[key] = hit
    return Response(200, hit[1])


STATIC: dict[str, Route] = {
    "/healthz": healthz, "/v2/health/live": healthz, "/readyz": readyz, "/v2/health/ready": v2_ready,
    "/v2": v2_server, "/v1/models": v1_models, "/metrics": metrics, "/openapi.json": openapi,
}


def find(path: str) -> tuple[Route, list[str]] | None:
    """The control route for ``path`` (and the path split on '/'), or None."""
    route = STATIC.get(path)
    if route is not None:
        return route, []
    if path.startswith("/v2/models/"):
        parts = path.split("/")
        if len(parts) == 4 or (len(parts) == 6 and parts[4] == "versions"):
            return v2_model, parts
        if parts[-1] == "ready" and (len(parts) == 5 or (len(parts) == 7 and parts[4] == "versions")):
            return v2_model_ready, parts
    return None


def answer(svc: Service, method: str, path: str) -> Response:
    """A control route's response (404 / 405 for unknown paths and methods)."""
    found = find(path)
    if found is None:
        raise RouteError(f"No endpoint {path[:200]}; see /openapi.json.")
    if method not in ("GET", "HEAD"):
        if method == "OPTIONS":
            return Response(200, b"", headers={"Allow": "GET, HEAD, OPTIONS"})
        raise MethodNotAllowed(f"Method {method} is not allowed on {path[:200]}.", allow="GET, HEAD, OPTIONS")
    route, parts = found
    if parts and any(not p for p in parts[3:]):  # /v2/models//ready and friends
        raise RouteError(f"No endpoint {path[:200]}; see /openapi.json.")
    return route(svc, parts)
