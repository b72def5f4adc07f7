"""The ASGI engine under real gunicorn + uvicorn workers on 127.0.0.1: TCP_NODELAY (no ~40 ms delayed-ACK
stall on keep-alive requests), slow and silent clients (header, body and idle deadlines; normal requests
unharmed), and connections shared across workers."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from kit.demo import DigitsMLP
from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "asgi-digits"
BODY = json.dumps({"inputs": [[0.5] * 64]}).encode()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("asgi")
    reg = Registry(root / "registry", require_gate=True, user="test")
    torch.manual_seed(0)
    reg.register(MODEL, DigitsMLP().eval(), torch.rand(2, 64))
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("asgi", MODEL, registry=reg.root, out_dir=root / "services", workers=2,
                 header_timeout=2.0, body_timeout=2.0, keepalive=2)
    with start_service(d, timeout=120) as running:
        yield running


def _addr(running):
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _request(sock: socket.socket, path: str = "/predict") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode()
    sock.sendall(head + BODY)
    return _response(sock)[0]


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_part, _, rest = data.partition(b"\r\n\r\n")
    length = int([ln.split(b":")[1] for ln in head_part.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head_part, rest


def test_keep_alive_requests_are_not_delayed_by_nagle(svc):
    sock = socket.create_connection(_addr(svc))
    try:
        assert _request(sock).startswith(b"HTTP/1.1 200")
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert _request(sock).startswith(b"HTTP/1.1 200")
            times.append(time.perf_counter() - t0)
    finally:
        sock.close()
    times.sort()
    # with Nagle on, each response's body segment waits for the client's delayed ACK: ~40 ms per request
    assert times[len(times) // 2] < 0.02, f"median keep-alive request took {times[len(times) // 2] * 1000:.1f} ms"


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection: EOF (perhaps after a 4xx answer) or a reset within
    0.5 s; False while it still holds the connection open."""
    sock.settimeout(0.5)
    try:
        while sock.recv(1024):  # a 4xx answer may come first; the close is the EOF after it
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_slow_and_silent_clients_neither_starve_the_service_nor_stay_open(svc):
    addr = _addr(svc)
    silent = [socket.create_connection(addr) for _ in range(200)]
    trickle = [socket.create_connection(addr) for _ in range(50)]
    short = [socket.create_connection(addr) for _ in range(8)]
    for s in short:  # promise 1000 bytes, send 10
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10)
    stop = threading.Event()

    def drip() -> None:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        for i in range(len(head)):
            for s in trickle:
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.05):
                return

    dripper = threading.Thread(target=drip)
    dripper.start()
    t_start = time.monotonic()
    latencies, statuses = [], []
    try:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        while time.monotonic() - t_start < 3.5:  # past the 2 s header and body deadlines
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body=BODY, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
            latencies.append(time.perf_counter() - t0)
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(*addr, timeout=10)
            time.sleep(0.01)
        conn.close()
        assert len(statuses) > 50 and set(statuses) == {200}
        latencies.sort()
        p95 = latencies[int(len(latencies) * 0.95)]
        assert p95 < 0.25, f"p95 {p95 * 1000:.0f} ms with slow clients attached"
        time.sleep(max(0.0, t_start + 3.0 - time.monotonic()))
        assert all(_closed_by_server(s) for s in silent), "silent sockets outlived the header deadline"
        assert all(_closed_by_server(s) for s in short), "short bodies outlived the body deadline"
        assert sum(_closed_by_server(s) for s in trickle) == len(trickle), "trickling heads outlived the deadline"
    finally:
        stop.set()
        dripper.join()
        for s in silent + trickle + short:
            s.close()
    logged = [json.loads(line) for line in svc.logs().splitlines() if line.startswith("{") and '"status":408' in line]
    assert len(logged) >= 8  # each short body is logged as a 408 (body not received in time)


def _pid(addr) -> int:
    with socket.create_connection(addr) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return int(json.loads(_response(s)[1])["pid"])


def test_connections_are_shared_across_workers(svc):
    addr = _addr(svc)
    deadline = time.monotonic() + 60
    while len({_pid(addr) for _ in range(4)}) < 2:  # the second worker may still be loading the model
        assert time.monotonic() < deadline, "only one worker ever answered"
        time.sleep(0.2)
    splits = []
    for _ in range(8):  # every round, whichever worker wakes first
        socks = [socket.create_connection(addr) for _ in range(8)]
        try:
            pids = []
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                pids.append(json.loads(_response(s)[1])["pid"])
            splits.append(sorted(pids.count(p) for p in set(pids)))
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)
    # A worker leaves a connection to its peer for at most ACCEPT_MAX_WAIT (2 ms); on a loaded machine a
    # descheduled peer misses that now and then, by design. With it a quiet machine splits every round 4/4;
    # without it (measured) the kernel's wake-ups split 3/5, 2/6, 1/7 and rarely 4/4.
    balanced = [c for c in splits if c == [4, 4]]
    assert len(balanced) >= 5, f"8 connections per round split {splits} between the workers"


def test_max_requests_restarts_workers_without_failing_a_request(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=True, user="test")
    torch.manual_seed(0)
    reg.register(MODEL, DigitsMLP().eval(), torch.rand(2, 64))
    reg.promote(MODEL, 1, force=True, why="test")
    d = generate("recycle", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=2,
                 max_requests=25, max_requests_jitter=0)
    with start_service(d, timeout=120) as running:
        addr = _addr(running)
        statuses, errors = [], []

        def client() -> None:
            conn = http.client.HTTPConnection(*addr, timeout=60)
            for _ in range(40):
                try:
                    conn.request("POST", "/predict", body=BODY, headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    statuses.append(r.status)
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection(*addr, timeout=60)
                except OSError as exc:
                    errors.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection(*addr, timeout=60)
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
        logs = running.logs()
    assert errors == [] and statuses == [200] * 160, (errors[:3], sorted(set(statuses)))
    assert logs.count("Booting worker with pid") >= 4  # 160 requests over 25-request workers: restarts happened
