"""The inference handler of the ASGI engine (``POST /predict`` and v2 infer), and what it shares with the
control routes: the per-worker :class:`Service` context, authorisation and the one request-log function.

A request is parsed and checked on the event loop (:mod:`kit.serving.protocol`), its forward pass runs on
the worker's inference thread (:class:`kit.serving.engine.InferenceEngine`), and the response is written
back on the loop. Per loaded version, :meth:`Service.compiled` keeps what the handler needs (the raw
forward, the version as text, the signature compiled for parsing), built once when the version is first
served. Requests are numpy arrays from parsing to the response, whichever backend serves.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kit.serving.config import ServiceConfig
from kit.serving.engine import Forward, InferenceEngine
from kit.serving.http import (
    OCTETS,
    ClientGone,
    MethodNotAllowed,
    NotReady,
    RateLimited,
    Receive,
    Response,
    Scope,
    content_length,
    read_body,
    respond_to,
)
from kit.serving.logs import log_access
from kit.serving.metrics import Metrics
from kit.serving.protocol import (
    BINARY_HEADER,
    CompiledSignature,
    parse_predict,
    parse_v2_infer,
    predict_response,
    v2_response,
)
from kit.serving.router import RouteError, choose
from kit.serving.security import Authenticator, Identity, RateLimiter
from kit.serving.slots import ModelSlots, Slot
from kit.signature import Signature

if TYPE_CHECKING:
    import numpy as np

    from kit.serving.hooks import RequestHooks

log = logging.getLogger("kit.serving.app")

VERSION_HEADER_OUT = "X-Kit-Model-Version"
_BINARY = BINARY_HEADER.lower().encode()


@dataclass(frozen=True)
class Compiled:
    """One served version, prepared once: what the inference handler reads per request."""

    slot: Slot
    forward: Forward
    version: str
    signature: Signature
    max_batch: int  # rows per forward pass: the service's and the exported program's limit
    wire: CompiledSignature  # what parsing and answering read


@dataclass
class Service:
    """Everything one worker's handlers share; built once by :func:`kit.serving.asgi.create_asgi_app`."""

    config: ServiceConfig
    slots: ModelSlots
    metrics: Metrics
    auth: Authenticator
    limiter: RateLimiter
    engine: InferenceEngine
    hooks: RequestHooks | None = None  # canary guard, traffic capture
    pid: int = field(default_factory=os.getpid)
    _compiled: dict[int, Compiled] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        self.model = cfg.model
        self.version_header = cfg.version_header.lower().encode() if cfg.version_header else None
        self.user_header = cfg.user_header.lower().encode() if cfg.user_header else None

    def compiled(self, slot: Slot) -> Compiled:
        c = self._compiled.get(id(slot))
        if c is None or c.slot is not slot:
            if len(self._compiled) > 8:  # versions come and go with reloads; keep the ones served now
                live = {id(s) for s in self.slots.state.slots()}
                self._compiled = {k: v for k, v in self._compiled.items() if k in live}
            c = Compiled(slot, slot.forward, str(slot.version), slot.signature, slot.max_batch, slot.wire)
            self._compiled[id(slot)] = c
        return c

    def not_ready_reason(self) -> str:
        err = self.slots.last_error
        return err["error"] if err else "still loading"

    def authorize(self, headers: dict[bytes, bytes], client_addr: str | None) -> Identity:
        """The caller (API key hashed once, or a JWT: :class:`kit.serving.security.Authenticator`), then the
        rate limit; :class:`~kit.serving.security.Unauthorized` / :class:`~kit.serving.http.RateLimited`."""
        who = self.auth.identify(_text(headers, b"x-api-key"), _text(headers, b"authorization"))
        if self.limiter.enabled:
            ok, wait = self.limiter.allow(who.client or f"addr:{client_addr}")
            if not ok:
                raise RateLimited(f"Rate limit exceeded ({self.config.rate_limit:g} requests/s per client); "
                                  f"retry in {wait:.2f}s.", retry_after=wait)
        return who


@dataclass
class Outcome:
    """What the request log and the metrics record about one request."""

    rid: str
    version: int | None = None
    route: str | None = None
    batch: int = 0
    shape: list[int] | None = None
    signature: Signature | None = None  # what the request hooks (guard, capture) see
    inputs: tuple[np.ndarray, ...] | None = None
    outputs: tuple[np.ndarray, ...] | None = None


def log_request(svc: Service, scope: Scope, out: Outcome, status: int, seconds: float, *,
                inference: bool) -> None:
    """The one place a request is recorded: the metrics (inference only) and one JSON log line."""
    if inference:
        svc.metrics.observe(svc.model, out.version, out.route or "rejected", status, seconds, out.batch)
        if svc.hooks is not None:
            svc.hooks.finished(out.rid, out.version, status, seconds, out.signature, out.inputs, out.outputs)
    if svc.config.access_log:
        log_access({"request_id": out.rid, "method": scope["method"], "path": scope["path"], "model": svc.model,
                    "version": out.version, "route": out.route, "status": status,
                    "latency_ms": round(seconds * 1000, 3), "batch": out.batch, "input_shape": out.shape})


async def infer(svc: Service, scope: Scope, receive: Receive, out: Outcome, name: str | None,
                version: str | None) -> Response:
    """``POST /predict`` (``name`` None) or v2 infer of model ``name`` (``version``: a pinned version)."""
    headers = dict(scope["headers"])
    resp_headers = {"X-Request-Id": out.rid}
    out.route = "rejected"
    if scope["method"] != "POST":
        raise MethodNotAllowed(f"Method {scope['method']} is not allowed here; use POST.", allow="POST")
    client = scope.get("client")
    who = svc.authorize(headers, client[0] if client else None)
    if name is not None and name != svc.model:
        raise RouteError(f"This service serves model {svc.model!r}, not {name[:64]!r}.")
    body = await read_body(receive, content_length(headers), svc.config.max_body_bytes)
    state = svc.slots.state
    if not state.ready:
        raise NotReady(f"Model {svc.model!r} is not loaded yet ({svc.not_ready_reason()}).")
    override = version or _text(headers, svc.version_header)
    slot, out.route = choose(state, model=svc.model, override=override,
                             user=who.user or _text(headers, svc.user_header))
    if version:
        out.route = "path"
    c = svc.compiled(slot)
    out.version = slot.version
    resp_headers[VERSION_HEADER_OUT] = c.version
    max_rows = svc.config.max_batch
    if name is None:
        inputs, unbatched = parse_predict(body, c.wire, max_rows)
        out.shape, out.signature, out.inputs = list(inputs[0].shape), c.signature, inputs
        outputs, out.batch = await svc.engine.submit(c.forward, inputs, c.max_batch)
        out.outputs = outputs
        return Response(200, predict_response(outputs, c.wire, unbatched, svc.model, slot.version),
                        headers=resp_headers)
    binary = headers.get(_BINARY)
    inputs, doc = parse_v2_infer(body, binary.decode("latin-1") if binary is not None else None, c.wire,
                                 max_rows)
    out.shape, out.signature, out.inputs = list(inputs[0].shape), c.signature, inputs
    outputs, out.batch = await svc.engine.submit(c.forward, inputs, c.max_batch)
    out.outputs = outputs
    data, header_len = v2_response(outputs, c.wire, doc, svc.model, slot.version)
    if header_len is None:
        return Response(200, data, headers=resp_headers)
    resp_headers[BINARY_HEADER] = str(header_len)
    return Response(200, data, OCTETS, resp_headers)


def _text(headers: dict[bytes, bytes], name: bytes | None) -> str | None:
    if name is None:
        return None
    v = headers.get(name)
    return v.decode("latin-1") if v is not None else None


async def run_infer(svc: Service, scope: Scope, receive: Receive, name: str | None,
                    version: str | None) -> tuple[Response | None, Outcome]:
    """:func:`infer` with its errors turned into responses; None when the client went away."""
    out = Outcome(request_id(scope))
    try:
        resp = await infer(svc, scope, receive, out, name, version)
    except ClientGone:
        return None, out
    except Exception as exc:
        resp = respond_to(exc, out.rid, scope["path"])  # a body too large also closes the connection
        resp.headers["X-Request-Id"] = out.rid
        if out.version is not None:  # a canary's 5xx must be attributable to it as much as its 200s
            resp.headers[VERSION_HEADER_OUT] = str(out.version)
    return resp, out


_IDS: tuple[int, str, Iterator[int]] = (-1, "", itertools.count())


def request_id(scope: Scope) -> str:
    """The client's X-Request-Id, else a new id: a random per-process prefix and a counter (unique, and
    no getrandom call per request)."""
    global _IDS
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            return str(v.decode("latin-1"))[:128]
    pid, prefix, counter = _IDS
    if pid != os.getpid():  # first call in this process (a forked worker must not repeat its parent's ids)
        _IDS = pid, prefix, counter = os.getpid(), os.urandom(5).hex(), itertools.count()
    return f"{prefix}{next(counter):06x}"


def now() -> float:
    return time.perf_counter()
