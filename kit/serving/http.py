"""The HTTP vocabulary of the ASGI engine: the one table from error types to HTTP statuses, the response
type, and reading a request body.

Errors carry no HTTP status. A client-facing failure is raised as the error type that says what went wrong
(:class:`~kit.serving.protocol.RequestError`, :class:`~kit.serving.router.RouteError`,
:class:`~kit.serving.security.Unauthorized` and the few below); :data:`STATUS` maps each type to its status
and :func:`error_response` builds the response (``{"error": message}`` plus the headers that status needs).
Any other exception is a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from kit.errors import ServingError
from kit.serving.protocol import RequestError
from kit.serving.router import RouteError
from kit.serving.security import Unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"
log = logging.getLogger(__name__)


class BodyTooLarge(RequestError):
    """The body is over ``[limits] max_body_bytes`` (its rest is unread: the connection closes)."""


class MethodNotAllowed(ServingError):
    """The path exists but not for this method; ``allow`` lists the methods it takes."""

    def __init__(self, message: str, *, allow: str):
        super().__init__(message)
        self.allow = allow


class RateLimited(ServingError):
    """The client is over ``[limits] rate_limit``; ``retry_after`` is the wait in seconds."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ServingError):
    """No version is loaded yet (or none could be)."""


class ClientGone(Exception):
    """The client closed the connection (or the server timed its body out) before the body arrived."""


# The one table: an error type (or its nearest listed base) -> the HTTP status a client gets.
STATUS: dict[type[Exception], int] = {
    RequestError: 400, BodyTooLarge: 413, Unauthorized: 401, RouteError: 404, MethodNotAllowed: 405,
    RateLimited: 429, NotReady: 503,
}


def status_of(exc: BaseException) -> int | None:
    """The status :data:`STATUS` gives ``exc``'s type (the most specific listed class wins), else None."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return None


def _headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": exc.challenge}
    if isinstance(exc, MethodNotAllowed):
        return {"Allow": exc.allow}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(max(1, round(exc.retry_after + 0.5)))}
    return {}


@dataclass
class Response:
    """What a handler returns: status, body bytes, content type and extra headers."""

    status: int = 200
    body: bytes = b""
    content_type: bytes = JSON
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False  # send Connection: close (after a body that was not read to the end)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), JSON, headers or {})

    @classmethod
    def error(cls, message: str, status: int, headers: dict[str, str] | None = None) -> Response:
        return cls(status, orjson.dumps({"error": message}), JSON, dict(headers or {}))


def error_response(exc: BaseException) -> Response | None:
    """The response for a client-facing error (its status from :data:`STATUS`), or None for any other
    exception (a bug or a model failure: the caller answers 500 and logs it)."""
    status = status_of(exc)
    if status is None:
        return None
    resp = Response.error(str(exc), status, _headers(exc))
    resp.close = isinstance(exc, BodyTooLarge)
    return resp


def respond_to(exc: BaseException, rid: str, where: str) -> Response:
    """The response to an exception a request raised: :func:`error_response`'s, else a 500 naming only its
    type and the request id (the traceback goes to the log, ``where`` names the request). Call it in the
    ``except`` block."""
    resp = error_response(exc)
    if resp is None:  # a bug or a model failure, never a client's fault
        log.exception("unhandled error on %s (request %s)", where, rid)
        resp = Response.error(f"Internal error ({type(exc).__name__}); see the service log, request id {rid}.", 500)
    return resp


async def send_response(send: Send, resp: Response) -> None:
    headers = [(b"content-type", resp.content_type), (b"content-length", str(len(resp.body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
    if resp.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send({"type": "http.response.body", "body": resp.body})


def header(scope: Scope, name: bytes) -> str | None:
    """One request header (``name`` lowercase bytes) as text, or None."""
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


async def read_body(receive: Receive, length: int | None, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (:class:`BodyTooLarge` above it). ``length`` is the Content-Length, if any.

    Raises :class:`ClientGone` when the client disconnects first; the server's body timeout closes slow
    senders' connections, which ends here the same way.
    """
    if length is not None and length > limit:
        raise BodyTooLarge(f"Request body too large ({length} bytes): the limit is {limit} bytes "
                           "([limits] max_body_bytes).")
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes ([limits] max_body_bytes).")
            parts.append(chunk)
        if not msg.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def content_length(scope_headers: dict[bytes, bytes]) -> int | None:
    raw = scope_headers.get(b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise RequestError("Content-Length is not a number.") from exc
