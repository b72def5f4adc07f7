"""The gunicorn worker of the ASGI engine: uvicorn's gunicorn worker (httptools, uvloop) with three
changes for serving models.

* **TCP_NODELAY** on every accepted connection: with Nagle on, a small response written in two
  segments waits for the client's delayed ACK (~40 ms on Linux) on a keep-alive connection.
* **Read deadlines** (:class:`KitHttpProtocol`): a request head must arrive within ``header_timeout``
  seconds of the connection opening (or of its first byte on a kept-alive connection) and be at most
  ``max_head_bytes``; a body within ``body_timeout`` of its head; an idle kept-alive connection closes
  after ``keepalive``. uvicorn alone resets its only timer on every byte and arms none for a new
  connection, so trickling or silent clients would hold sockets forever. A late client's connection is
  closed; on the event loop it never blocked anyone else.
* **Balanced accept** (:class:`BalancedListener`): all workers watch the one listening socket; a worker
  that holds more connections than the least-loaded live worker leaves a pending connection to it,
  re-checking every ``ACCEPT_POLL``; after ``ACCEPT_MAX_WAIT`` (the peer is descheduled, busy or stuck)
  it accepts everything pending, so no connection waits longer than that for a peer. When a worker has held 2 or more
  connections above a peer for ``REBALANCE_AFTER`` (a worker restarted for ``max_requests``), it asks one
  client per response to reconnect (``Connection: close``). Connection counts live in an anonymous shared
  memory map that the master creates when it imports this module (gunicorn imports the worker class
  before forking).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import multiprocessing
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

from kit._proc import pid_alive

log = logging.getLogger("kit.serving.worker")

ACCEPT_POLL = 0.001  # seconds between looks at the peers while a worker over its share leaves a connection
ACCEPT_MAX_WAIT = 0.002  # seconds pending connections wait for a less loaded peer before all are accepted
ACCEPT_BURST = 64  # connections accepted at most in one go once that wait is over
REBALANCE_AFTER = 0.1  # seconds an imbalance of 2+ connections lasts before clients are asked to reconnect
DRAIN_GRACE = 0.3  # seconds an idle kept-alive connection stays open once its worker shuts down
_SLOTS = 128
_SLOT = struct.Struct("qq")  # pid, open connections
_COUNT = struct.Struct("q")


class ConnectionShare:
    """Open connections per worker, in memory shared by every worker of one master."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SLOTS * _SLOT.size)  # anonymous, MAP_SHARED: inherited by fork
        self._lock = multiprocessing.Lock()
        self.index = -1
        self.count = 0
        self._peers: list[int] = []
        self._peers_at = 0.0
        self._over_since = 0.0

    def claim(self) -> None:
        """In a worker: take a free slot (empty, or of a dead process)."""
        pid = os.getpid()
        with self._lock:
            for i in range(_SLOTS):
                other, _ = _SLOT.unpack_from(self._map, i * _SLOT.size)
                if other == 0 or other == pid or not pid_alive(other):
                    _SLOT.pack_into(self._map, i * _SLOT.size, pid, 0)
                    self.index = i
                    return

    def release(self) -> None:
        if self.index >= 0:
            _SLOT.pack_into(self._map, self.index * _SLOT.size, 0, 0)
            self.index = -1

    def add(self, n: int) -> None:
        self.count += n
        if self.index >= 0:
            _COUNT.pack_into(self._map, self.index * _SLOT.size + 8, self.count)

    def least_peer(self) -> int | None:
        """The fewest connections any other live worker holds (None: no other worker)."""
        now = time.monotonic()
        if now - self._peers_at > 0.1:  # who is alive, re-checked ten times a second
            self._peers_at = now
            self._peers = [i for i in range(_SLOTS) if i != self.index
                           and (pid := _SLOT.unpack_from(self._map, i * _SLOT.size)[0]) and pid_alive(pid)]
        if not self._peers:
            return None
        return min(_COUNT.unpack_from(self._map, i * _SLOT.size + 8)[0] for i in self._peers)

    def excess(self) -> int:
        """How many connections this worker holds above the least-loaded other worker."""
        least = self.least_peer()
        return 0 if least is None else self.count - least

    def overloaded(self) -> bool:
        """True once this worker has held 2+ connections above a peer for ``REBALANCE_AFTER`` seconds:
        a burst's passing imbalance asks no client to reconnect; a lasting one does."""
        if self.excess() < 2:
            self._over_since = 0.0
            return False
        now = time.monotonic()
        if not self._over_since:
            self._over_since = now
        return now - self._over_since >= REBALANCE_AFTER


SHARE = ConnectionShare()  # created in the master at import, before any fork


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_head_bytes: int = 64 * 1024


class KitHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with TCP_NODELAY, read deadlines and connection accounting."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: Limits = getattr(config, "kit_limits", Limits())
        self.share: ConnectionShare | None = getattr(config, "kit_share", None)
        self._deadline: asyncio.TimerHandle | None = None
        self._head = 0  # bytes of the request head so far
        self._draining = False  # the worker is shutting down: answer what arrives, then close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (a unix socket)
                pass
        self._arm(self.limits.header_timeout)  # (the listener counted this connection when it accepted it)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.share is not None:
            self.share.add(-1)
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app sees http.disconnect if it was reading the body

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        if self._deadline is None:  # a new request on a kept-alive connection; a fresh one is armed already
            self._arm(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._head += len(url)
        self._check_head()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        self._check_head()
        super().on_header(name, value)

    def _check_head(self) -> None:
        if self._head > self.limits.max_head_bytes:
            self._disarm()
            from httptools import HttpParserError

            raise HttpParserError(f"request head over {self.limits.max_head_bytes} bytes")  # -> 400, close

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and (self._draining or self._last_requests()
                                       or (self.share is not None and self.share.overloaded())):
            self.cycle.keep_alive = False  # this client reconnects, most likely to a less loaded worker
        self._arm(self.limits.body_timeout)  # disarmed when the message completes

    def _last_requests(self) -> bool:
        """True for the requests that take this worker to ``max_requests``: their clients are told to
        reconnect (Connection: close), so none sends on a kept-alive connection the exiting worker closes."""
        limit = self.config.limit_max_requests
        return limit is not None and self.server_state.total_requests + len(self.server_state.tasks) >= limit

    def shutdown(self) -> None:
        """Graceful shutdown (SIGTERM, max_requests): a request in flight is answered with Connection: close;
        an idle kept-alive connection gets ``DRAIN_GRACE`` seconds before it closes, so a request its client
        has just sent is answered rather than cut off (uvicorn alone closes it at once)."""
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._arm(DRAIN_GRACE)
        else:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


class BalancedListener:
    """Accepts connections on a shared listening socket, deferring to less loaded workers."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol], share: ConnectionShare,
                 exiting: Callable[[], bool] | None = None):
        self.sock = sock
        self.factory = protocol_factory
        self.share = share
        self.exiting = exiting or (lambda: False)  # True once this worker has served its max_requests
        self.loop = asyncio.get_running_loop()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        if self.exiting():  # leave new connections to the other workers (or the replacement worker)
            self.close()
            return
        if self.share.excess() >= 1:  # leave it to a less loaded worker for a moment
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(ACCEPT_POLL, self._defer, time.monotonic() + ACCEPT_MAX_WAIT)
            return
        self._accept_one()

    def _defer(self, until: float) -> None:
        """Still ahead of a peer and not waited ``ACCEPT_MAX_WAIT`` yet: look again shortly; once the peer
        caught up accept one, once the wait is over accept all that is pending."""
        if self._closed:
            return
        if self.share.excess() < 1:
            self._accept_one()
        elif time.monotonic() < until:
            self.loop.call_later(ACCEPT_POLL, self._defer, until)
        else:
            self._accept_one(ACCEPT_BURST)

    def _accept_one(self, burst: int = 1) -> None:
        if self._closed:
            return
        for _ in range(burst):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and friends: say so, retry shortly
                log.error("accept failed: %s", exc)
                break
            self.share.add(1)  # counted now, so the next readiness check already sees it
            conn.setblocking(False)
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._readable)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            self.share.add(-1)
            conn.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        return None


class _Server(Server):
    """uvicorn's server with :class:`BalancedListener` instead of ``loop.create_server``, which does not
    re-raise the signal that stopped it: the worker class resets SIGTERM to its default, so re-raising it
    would kill the worker after its graceful shutdown instead of letting it exit with 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state)

        limit = config.limit_max_requests

        def exiting() -> bool:
            return limit is not None and self.server_state.total_requests >= limit

        self.servers = [BalancedListener(sock, create_protocol, SHARE, exiting)  # type: ignore[misc]
                        for sock in sockets]
        log.info("worker %d: accepting on %d socket(s), connection slot %d", os.getpid(), len(sockets), SHARE.index)
        self.started = True


class KitUvicornWorker(UvicornWorker):
    """gunicorn worker class of the ASGI engine (``worker_class`` in a generated gunicorn.conf.py)."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": KitHttpProtocol, "lifespan": "on"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = self.cfg.graceful_timeout
        self.config.kit_share = SHARE
        self.config.kit_limits = LIMITS  # set by the master (set_limits)

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        SHARE.claim()
        server = _Server(config=self.config)
        self._install_sigquit_handler()
        try:
            await server.serve(sockets=self.sockets)
        finally:
            SHARE.release()
        if not server.started:
            sys.exit(3)  # gunicorn's WORKER_BOOT_ERROR


LIMITS = Limits()


def set_limits(limits: Limits) -> None:
    """Called by a generated gunicorn.conf.py (in the master) with the service's read deadlines."""
    global LIMITS
    LIMITS = limits
