"""kit.serving.worker.KitHttpProtocol in a real uvicorn server on 127.0.0.1 (asyncio's loop): TCP_NODELAY is
on for every accepted connection, and a silent connection is closed after the header deadline. The
latency side (keep-alive requests not delayed) is tested against a real service in
tests/e2e/test_asgi_engine.py."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kit._proc import free_port
from kit.serving.worker import KitHttpProtocol, Limits


async def app(scope, receive, send):  # headers and body in two writes, like any ASGI app
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(protocol):
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", http=protocol, lifespan="off",
                            log_level="warning")
    config.kit_limits = Limits(header_timeout=1.0, body_timeout=1.0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, port


def _nodelay_of_open_connections(server) -> list[int]:
    return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for c in list(server.server_state.connections)]


def test_accepted_connections_get_tcp_nodelay():
    server, thread, port = _serve(KitHttpProtocol)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _ in range(3):  # keep-alive requests on one connection
                t0 = time.perf_counter()
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(b"ok"):
                    data += s.recv(4096)
            assert time.perf_counter() - t0 < 1.0
            assert _nodelay_of_open_connections(server) == [1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_silent_connection_is_closed_after_the_header_deadline():
    server, thread, port = _serve(KitHttpProtocol)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(5)
            t0 = time.monotonic()
            assert s.recv(10) == b""  # the server closed it
            assert 0.8 < time.monotonic() - t0 < 3.0
    finally:
        server.should_exit = True
        thread.join(10)
