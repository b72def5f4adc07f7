"""A small HTTP/1.1 load generator (asyncio, keep-alive, stdlib only) for benchmarks and load tests (not part
of the runtime: services never import it; tests/kit_testing.py runs it as a script).

``python benchmarks/loadgen.py URL --concurrency 8 --duration 5 --body-file req.json --out result.json``
Each request records (start time on the monotonic clock (perf_counter), latency, status, served version, user); nothing is retried, so every
failure counts. Connections are reused unless the server closes them (then it reconnects).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Result:
    records: list[tuple[float, float, int, str | None, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(r[1] for r in self.records if r[2] == 200)
        n = len(self.records)
        ok = len(lat)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        return {"requests": n, "ok": ok, "failed": n - ok + len(self.errors), "seconds": round(self.seconds, 3),
                "rps": ok / self.seconds if self.seconds else 0.0, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                "errors": self.errors[:5]}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return status, headers, body


async def _worker(host: str, port: int, requests: list[bytes], users: list[str | None], idx: int, stride: int,
                  stop_at: float, max_requests: int | None, counter: list[int], res: Result, t0: float,
                  check: Any, reconnect_every: int = 0) -> None:
    reader = writer = None
    i = idx
    on_conn = 0
    while time.perf_counter() < stop_at and (max_requests is None or counter[0] < max_requests):
        counter[0] += 1
        k = i % len(requests)
        i += stride
        try:
            if writer is not None and reconnect_every and on_conn >= reconnect_every:
                writer.close()
                reader = writer = None
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
                on_conn = 0
            on_conn += 1
            start = time.perf_counter()
            writer.write(requests[k])
            status, headers, body = await _read_response(reader)  # type: ignore[arg-type]
            lat = time.perf_counter() - start
            if status == 200 and check is not None and not check(body):
                status = 599  # a wrong answer is a failure
            res.records.append((start, lat, status, headers.get("x-kit-model-version"), users[k]))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            res.errors.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def build_request(url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST",
                  keep_alive: bool = True) -> bytes:
    u = urlsplit(url)
    h = {"Host": u.netloc, "Content-Type": "application/json", "Content-Length": str(len(body)),
         "Connection": "keep-alive" if keep_alive else "close", **(headers or {})}
    head = f"{method} {u.path or '/'} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def run(url: str, requests: list[bytes], *, concurrency: int = 8, duration: float = 5.0,
        max_requests: int | None = None, users: list[str | None] | None = None, check: Any = None,
        reconnect_every: int = 0) -> Result:
    """Send ``requests`` (raw HTTP bytes, cycled) from ``concurrency`` connections for ``duration`` s."""
    u = urlsplit(url)
    users = users or [None] * len(requests)
    res = Result()

    async def main() -> None:
        t0 = time.perf_counter()
        stop_at = t0 + duration
        counter = [0]
        await asyncio.gather(*(_worker(u.hostname or "127.0.0.1", u.port or 80, requests, users, i, concurrency,
                                       stop_at, max_requests, counter, res, t0, check, reconnect_every)
                               for i in range(concurrency)))
        res.seconds = time.perf_counter() - t0

    asyncio.run(main())
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url")
    p.add_argument("--body-file", required=True)
    p.add_argument("--header", action="append", default=[], help="Name: value")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--users", type=int, default=0, help="cycle N distinct X-Kit-User values")
    p.add_argument("--anonymous", type=int, default=0, help="with --users: also N requests with no user")
    p.add_argument("--user-header", default="X-Kit-User")
    p.add_argument("--reconnect-every", type=int, default=0, help="new connection after N requests (0: never)")
    p.add_argument("--out", required=True, help="JSON file with the summary and every record")
    a = p.parse_args()
    body = open(a.body_file, "rb").read()
    headers = dict(h.split(":", 1) for h in a.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if a.users:
        users: list[str | None] = [f"user-{i}" for i in range(a.users)] + [None] * a.anonymous
        reqs = [build_request(a.url, body, {**headers, a.user_header: u} if u else headers) for u in users]
    else:
        users = [None]
        reqs = [build_request(a.url, body, headers)]
    res = run(a.url, reqs, concurrency=a.concurrency, duration=a.duration, max_requests=a.max_requests, users=users,
              reconnect_every=a.reconnect_every)
    with open(a.out, "w") as f:
        json.dump({"summary": res.summary(), "records": res.records, "errors": res.errors}, f)


if __name__ == "__main__":
    main()
