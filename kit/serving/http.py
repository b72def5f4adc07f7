"""The HTTP vocabulary of the ASGI engine: one error type, one response type, and reading a request body.

Every client-facing failure on the ASGI path is an :class:`HttpError` (status, message, extra headers);
:func:`as_http_error` turns the errors raised by :mod:`kit.serving.protocol` (``RequestError``) and
:mod:`kit.serving.router` (``RouteError``), which carry a ``status`` too, into one. A response body is
always ``{"error": message}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson

from kit.errors import ServingError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"
REASONS = {s.value: s.phrase for s in HTTPStatus}


class HttpError(ServingError):
    """A request the service answers with ``status`` and ``{"error": message}`` (plus ``headers``)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ClientGone(Exception):
    """The client closed the connection (or the server timed its body out) before the body arrived."""


def as_http_error(exc: Exception) -> HttpError | None:
    """An :class:`HttpError` for any error that carries an HTTP ``status`` (RequestError, RouteError)."""
    if isinstance(exc, HttpError):
        return exc
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 600 and isinstance(exc, ServingError):
        return HttpError(str(exc), status, dict(getattr(exc, "headers", None) or {}))
    return None


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
    def error(cls, exc: HttpError) -> Response:
        return cls(exc.status, orjson.dumps({"error": str(exc)}), JSON, dict(exc.headers))


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


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    """All request headers (lowercase names; a repeated header keeps its last value)."""
    return dict(scope["headers"])


async def read_body(receive: Receive, length: int | None, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 above it). ``length`` is the Content-Length, if any.

    Raises :class:`ClientGone` when the client disconnects first; the server's body timeout closes slow
    senders' connections, which ends here the same way.
    """
    if length is not None and length > limit:
        raise HttpError(f"Request body too large ({length} bytes): the limit is {limit} bytes "
                        "([limits] max_body_bytes).", 413)
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
                raise HttpError(f"Request body too large: the limit is {limit} bytes ([limits] max_body_bytes).",
                                413)
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
        raise HttpError("Content-Length is not a number.") from exc
