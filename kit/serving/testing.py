"""``KitAsgiApp.test_client()``: a synchronous client for the ASGI app without a server, with the parts of
Flask's test-client API that tests use (``get``/``post``/``open`` with ``json=``, ``data=``, ``headers=``;
responses with ``status_code``, ``headers``, ``data``, ``json``, ``get_json()``). The app runs on a real
event loop in a daemon thread (its inference thread resolves futures on that loop); no sockets."""

from __future__ import annotations

import asyncio
import json as _json
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kit.serving.http import Message, Receive, Scope, Send

    AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Headers(dict[str, str]):
    """Response headers, looked up case-insensitively."""

    def __getitem__(self, key: str) -> str:
        return str(super().__getitem__(key.lower()))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(str(key).lower())


class TestResponse:
    __test__ = False

    def __init__(self, status: int, headers: Headers, data: bytes):
        self.status_code = status
        self.headers = headers
        self.data = data

    @property
    def json(self) -> Any:
        return _json.loads(self.data) if self.data else None

    def get_json(self) -> Any:
        return self.json


class AsgiTestClient:
    __test__ = False

    def __init__(self, app: AsgiApp, client: tuple[str, int] = ("127.0.0.1", 50000)):
        self.app = app
        self.client = client
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def get(self, path: str, **kw: Any) -> TestResponse:
        return self.open("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> TestResponse:
        return self.open("POST", path, **kw)

    def open(self, method: str, path: str, *, json: Any = None, data: bytes | str | None = None,
             headers: dict[str, str] | None = None) -> TestResponse:
        body = data.encode() if isinstance(data, str) else (data or b"")
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        if json is not None:
            body = _json.dumps(json).encode()
            hdrs.setdefault("content-type", "application/json")
        hdrs["content-length"] = str(len(body))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path.split("?")[0], "raw_path": path.encode(),
                 "query_string": path.partition("?")[2].encode(), "root_path": "",
                 "headers": [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in hdrs.items()],
                 "client": self.client, "server": ("127.0.0.1", 80)}
        fut = asyncio.run_coroutine_threadsafe(self._call(scope, body), self.loop)
        return fut.result(60)

    async def _call(self, scope: Scope, body: bytes) -> TestResponse:
        sent = False
        status, headers, chunks = 0, Headers(), []

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a real server only reports a disconnect
            return {"type": "http.disconnect"}

        async def send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                for k, v in msg.get("headers", []):
                    headers[k.decode("latin-1").lower()] = v.decode("latin-1")
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, send)
        return TestResponse(status, headers, b"".join(chunks))
