"""API keys (stored as sha256, compared in constant time) and a per-client token-bucket rate limit."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from kit.errors import ServiceError

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The sha256 hex digest stored for an API key (``service.toml`` or a keys file)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def read_keys_file(path: Path) -> tuple[str, ...]:
    """One sha256 hex digest per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ServiceError(f"Cannot read the API keys file {path} ({exc}). Create it with one sha256 "
                           "hex digest per line, or remove [auth] keys_file.") from exc
    out = []
    for n, line in enumerate(lines, 1):
        s = line.split("#", 1)[0].strip().lower()
        if not s:
            continue
        if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
            raise ServiceError(f"{path}:{n}: {s[:20]!r} is not a sha256 hex digest (64 hex characters).")
        out.append(s)
    return tuple(out)


class ApiKeys:
    """Checks presented keys against stored hashes. A keys file is re-read when it changes."""

    def __init__(self, hashes: tuple[str, ...] = (), keys_file: Path | None = None):
        self._static = tuple(h.lower() for h in hashes)
        self.keys_file = keys_file
        self._file_hashes: tuple[str, ...] = ()
        self._file_key: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if keys_file is not None:
            self._file_hashes = read_keys_file(keys_file)
            self._file_key = self._stat()

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self.keys_file is not None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.keys_file)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.keys_file is None or now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            key = self._stat()
            if key != self._file_key:
                try:
                    self._file_hashes = read_keys_file(self.keys_file)
                    self._file_key = key
                    log.info("API keys reloaded from %s (%d keys)", self.keys_file, len(self._file_hashes))
                except ServiceError as exc:  # keep the old keys; say so
                    log.error("keeping the previous API keys: %s", exc)

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` hashes to a stored key; every stored hash is compared (constant time)."""
        if not presented:
            return False
        return self.check_digest(hash_key(presented))

    def check_digest(self, digest: str) -> bool:
        """True when the sha256 hex ``digest`` of a presented key is stored (for callers that hashed it once)."""
        self._maybe_reload()
        ok = False
        for h in self._static + self._file_hashes:
            ok |= hmac.compare_digest(digest, h)
        return ok


class RateLimiter:
    """Token buckets per client key: ``rate`` requests/second, bursts up to ``burst``. Per worker."""

    def __init__(self, rate: float, burst: int = 0, max_clients: int = 10_000):
        self.rate = float(rate)
        self.burst = float(burst or max(1.0, rate))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next token)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return ok, 0.0 if ok else (1.0 - tokens) / self.rate
