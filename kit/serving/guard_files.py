"""The canary guard's per-worker window files, on storage anyone with write access to the registry can change.

A worker's file ``<registry>/<model>/guard/<key>/<host>-<pid>.json`` (``key`` = ``v<canary>-s<serial>``) is::

    kit-guard-window/1 <hex HMAC-SHA256>\\n
    {"model": ..., "key": ..., "worker": ..., "seq": 12, "updated": 1795890399.1, "slot_s": 2,
     "sides": {"production": [[sec, n, err, [[bucket, count], ...]], ...], "canary": [...]}}

The MAC (:func:`kit.guard_key.window_mac_key`, from the service's guard key) is over the model, the folder's
key, the file's worker name and the exact payload bytes, so a file cannot be forged without the key, nor
copied to another worker's name, another canary or another serial; ``seq`` only goes forward, so an older
file of a worker put back is refused. A file is read at most :data:`MAX_FILE_BYTES` + 1 bytes, through
``O_NOFOLLOW`` (a link is refused, never followed), only if it is a regular file; the MAC is checked before
a byte is parsed, and then the payload is held to its types and ranges (counts, buckets, slots, times).
Folders are opened one level at a time with ``O_NOFOLLOW`` and must belong to this process's user; files
are written to a fresh temp name (``O_EXCL | O_NOFOLLOW``) and renamed over the worker's name in the same
folder, so a planted link is replaced, never written through.

Anything refused raises :class:`WindowFileRejected` (``reason``: a short category for the metric).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kit.errors import IntegrityError

HEADER = b"kit-guard-window/1 "
MAX_FILE_BYTES = 64 * 1024  # a real file is a few KB; the format's worst case (below) fits
MAX_SLOTS = 20  # time slots per window (slot width = window / 20, at least 1 s): 21 slots x 2 sides x 81 buckets < 64 KB
MAX_FILES = 256  # worker files read per tick; files that verified before are read first
MAX_COUNT = 10**9
TOP_BUCKET = 80  # kit.serving.guard's latency histogram has buckets 0..80
SIDES = ("production", "canary")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}-[0-9]{1,10}\.json")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Slot = tuple[int, int, int, tuple[tuple[int, int], ...]]  # (slot start, requests, 5xx, ((bucket, count), ...))


class WindowFileRejected(IntegrityError):
    """A window file (or the folder) was refused; ``reason`` is one of: auth, size, type, parse, replay,
    folder."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WindowFile:
    """A verified worker file."""

    worker: str
    seq: int
    updated: float
    sides: Mapping[str, tuple[Slot, ...]]


def slot_width(window_s: float) -> int:
    """Seconds per time slot: at most :data:`MAX_SLOTS` slots per window, at least 1 s."""
    return max(1, math.ceil(window_s / MAX_SLOTS))


def worker_name(host: str, pid: int) -> str:
    """``<host>-<pid>``, the host reduced to file-name characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host)[:100].lstrip(".") or "host"
    return f"{safe}-{pid}"


def _mac(mac_key: bytes, model: str, key: str, worker: str, payload: bytes) -> str:
    bound = b"\0".join(x.encode() for x in ("kit-guard-window/1", model, key, worker)) + b"\0"
    return hmac.new(mac_key, bound + payload, hashlib.sha256).hexdigest()


def encode(mac_key: bytes, model: str, key: str, worker: str, seq: int, updated: float, slot_s: int,
           sides: Mapping[str, list[Slot]]) -> bytes:
    """A worker's file: header with the MAC, then the payload."""
    doc = {"model": model, "key": key, "worker": worker, "seq": seq, "updated": round(updated, 3), "slot_s": slot_s,
           "sides": {s: [[sec, n, err, [list(h) for h in hist]] for sec, n, err, hist in sides.get(s, [])]
                     for s in SIDES}}
    payload = json.dumps(doc, separators=(",", ":")).encode()
    return HEADER + _mac(mac_key, model, key, worker, payload).encode() + b"\n" + payload


def decode(mac_key: bytes, model: str, key: str, worker: str, data: bytes, now: float) -> WindowFile:
    """Verify ``data`` (the bytes read once) as ``worker``'s file of ``key``, then parse those bytes strictly."""
    head, nl, payload = data.partition(b"\n")
    if not nl or not head.startswith(HEADER):
        raise WindowFileRejected("auth", f"{worker}.json is not an authenticated guard window file (no MAC)")
    if not hmac.compare_digest(head[len(HEADER):], _mac(mac_key, model, key, worker, payload).encode()):
        raise WindowFileRejected("auth", f"{worker}.json does not carry this service's guard MAC for {model}/{key} "
                                         "(forged, altered, or copied from another worker, canary or serial)")
    try:
        doc = json.loads(payload)
        return _parse(doc, model, key, worker, now)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise WindowFileRejected("parse", f"{worker}.json is authenticated but malformed: {exc}") from exc


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{what} = {str(v)[:40]!r} is not an integer in [{lo}, {hi}]")
    return v


def _parse(doc: object, model: str, key: str, worker: str, now: float) -> WindowFile:
    if not isinstance(doc, dict) or set(doc) != {"model", "key", "worker", "seq", "updated", "slot_s", "sides"}:
        raise ValueError("unexpected fields")
    if (doc["model"], doc["key"], doc["worker"]) != (model, key, worker):
        raise ValueError("model, key or worker differ from the file's place")
    updated = doc["updated"]
    if type(updated) not in (int, float) or not 0 <= updated <= now + 3600:
        raise ValueError(f"updated = {updated!r}")
    seq = _int(doc["seq"], 0, 2**62, "seq")
    _int(doc["slot_s"], 1, 10**6, "slot_s")
    if not isinstance(doc["sides"], dict) or set(doc["sides"]) != set(SIDES):
        raise ValueError("sides must be production and canary")
    sides: dict[str, tuple[Slot, ...]] = {}
    for side in SIDES:
        slots = doc["sides"][side]
        if not isinstance(slots, list) or len(slots) > MAX_SLOTS + 1:
            raise ValueError(f"{side}: at most {MAX_SLOTS + 1} slots")
        parsed: list[Slot] = []
        for s in slots:
            if not isinstance(s, list) or len(s) != 4 or not isinstance(s[3], list) or len(s[3]) > TOP_BUCKET + 1:
                raise ValueError(f"{side}: a slot is [sec, n, err, [[bucket, count], ...]]")
            sec = _int(s[0], 0, int(now) + 3600, "sec")
            n = _int(s[1], 1, MAX_COUNT, "n")
            err = _int(s[2], 0, n, "err")
            hist = tuple((_int(h[0], 0, TOP_BUCKET, "bucket"), _int(h[1], 1, MAX_COUNT, "count"))
                         for h in s[3] if isinstance(h, list) and len(h) == 2)
            if len(hist) != len(s[3]) or [b for b, _ in hist] != sorted({b for b, _ in hist}) \
                    or sum(c for _, c in hist) != n:
                raise ValueError(f"{side}: a slot's histogram must hold its {n} requests in increasing buckets")
            if parsed and sec <= parsed[-1][0]:
                raise ValueError(f"{side}: slots must be in increasing time")
            parsed.append((sec, n, err, hist))
        sides[side] = tuple(parsed)
    return WindowFile(worker, seq, float(updated), sides)


# --------------------------------------------------------------------------- the folder, without following links


@contextmanager
def open_key_folder(model_dir: Path, key: str, *, create: bool) -> Iterator[int | None]:
    """A descriptor of ``<model_dir>/guard/<key>`` (made when ``create``), or None when it does not exist.

    Each level below the model folder is opened with ``O_NOFOLLOW`` and must be a folder of this user:
    a planted link or someone else's folder raises :class:`WindowFileRejected` ("folder")."""
    fds: list[int] = []
    try:
        fds.append(os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))  # the registry may be a link
        for name in ("guard", key):
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fds[-1])  # never parents: an unmounted registry must not be remade
                except FileExistsError:
                    pass
            try:
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=fds[-1]))
            except FileNotFoundError:
                yield None
                return
            except OSError as exc:
                raise WindowFileRejected("folder", f"{model_dir.name}/guard: {name!r} is not a plain folder ({exc}); "
                                                   "it was not followed. Remove it.") from exc
            st = os.fstat(fds[-1])
            if st.st_uid != os.geteuid():
                raise WindowFileRejected("folder", f"{model_dir.name}/guard: {name!r} belongs to uid {st.st_uid}, "
                                                   f"not this service's ({os.geteuid()}); not used. Remove it.")
        yield fds[-1]
    finally:
        for fd in reversed(fds):
            os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` in the folder: a new temp file (never an existing one, never a link), renamed
    over ``name`` (a link there is replaced, not followed). Not fsync'd: a lost window is recounted."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def read_file(dir_fd: int, name: str) -> tuple[bytes, tuple[int, int, int]]:
    """At most ``MAX_FILE_BYTES`` of a regular file, never through a link; and (inode, size, mtime_ns)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP: a link; ENXIO: a socket; gone: replaced meanwhile
        raise WindowFileRejected("type", f"{name} cannot be opened as a plain file ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        if not stat.S_ISREG(st.st_mode):
            raise WindowFileRejected("type", f"{name} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise WindowFileRejected("size", f"{name} is {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap")
        chunks, got = [], 0
        while got <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > MAX_FILE_BYTES:  # it grew after fstat
            raise WindowFileRejected("size", f"{name} is over the {MAX_FILE_BYTES}-byte cap")
        return b"".join(chunks), ident
    finally:
        os.close(fd)


def worker_files(dir_fd: int, own: str, preferred: set[str]) -> tuple[list[str], int]:
    """The other workers' file names in the folder (at most :data:`MAX_FILES`, ``preferred`` first) and how
    many names of any kind were passed over."""
    names = os.listdir(dir_fd)
    ours = sorted((n for n in names if n != own and _NAME.fullmatch(n)), key=lambda n: (n[:-5] not in preferred, n))
    return ours[:MAX_FILES], len(names) - min(len(ours), MAX_FILES) - (own in names)


def sweep(dir_fd: int, older_than: float) -> int:
    """Remove worker files and temp files not changed since ``older_than`` (dead workers': nothing in them
    is inside any window now). Unlink removes a name, never what a link points at. Returns how many."""
    gone = 0
    for n in os.listdir(dir_fd):
        if not (_NAME.fullmatch(n) or (n.startswith(".") and n.endswith(".tmp"))):
            continue
        try:
            st = os.stat(n, dir_fd=dir_fd, follow_symlinks=False)
            if st.st_mtime < older_than and not stat.S_ISDIR(st.st_mode):
                os.unlink(n, dir_fd=dir_fd)
                gone += 1
        except OSError:
            continue
    return gone


def forget(model_dir: Path, key: str, name: str) -> None:
    """Remove this worker's file of a finished key, and the folder once every worker has."""
    try:
        with open_key_folder(model_dir, key, create=False) as fd:
            if fd is None:
                return
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
        _remove_empty(model_dir, key)
    except OSError:  # other workers' files are still there (they remove theirs when they move on)
        pass


def _remove_empty(model_dir: Path, key: str) -> None:
    gfd = os.open(model_dir / "guard", _DIR_FLAGS)
    try:
        os.rmdir(key, dir_fd=gfd)
    except OSError:
        pass
    finally:
        os.close(gfd)


def sweep_old_keys(model_dir: Path, keep: str | None, older_than: float) -> int:
    """Sweep the folders of other keys (splits that are over: dead workers left their files there), removing
    each folder once empty. Links and foreign folders are left alone. Returns how many files went."""
    gone = 0
    try:
        gfd = os.open(model_dir / "guard", _DIR_FLAGS)
    except OSError:
        return 0
    try:
        keys = [k for k in os.listdir(gfd) if k != keep and re.fullmatch(r"v[0-9]{1,9}-s[0-9]{1,12}", k)]
    finally:
        os.close(gfd)
    for k in keys:
        try:
            with open_key_folder(model_dir, k, create=False) as fd:
                if fd is not None:
                    gone += sweep(fd, older_than)
            _remove_empty(model_dir, k)
        except OSError:
            continue
    return gone


__all__ = ["MAX_FILE_BYTES", "MAX_FILES", "MAX_SLOTS", "WindowFile", "WindowFileRejected", "decode", "encode",
           "forget", "open_key_folder", "read_file", "slot_width", "sweep", "sweep_old_keys", "worker_files", "worker_name",
           "write_file"]
