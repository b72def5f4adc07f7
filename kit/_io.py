"""Atomic file writes, hashing, and reading untrusted files once. Every write Kit makes goes through here."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from kit.errors import StorageError

_CHUNK = 1 << 20
# Kept free beyond what a write needs: the file system's own blocks (folders, inodes, journal) and a
# concurrent small write (an event line, a lock file) must still fit after ours.
SPACE_SLACK = 1 << 20
# The errors a storage gives when it refuses a write: these become one StorageError line.
_STORAGE_ERRNOS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EROFS: "is read-only",
                   errno.EIO: "gave an I/O error", errno.EFBIG: "refused a file that large"}


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread exists.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file here (0666 less the umask)."""
    return _FILE_MODE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open_regular(path: Path) -> Any:
    """``open(path, "rb")`` that refuses (``ValueError``) anything but a regular file, without blocking on
    a FIFO (O_NONBLOCK has no effect on regular files)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, read once through one open file; ``ValueError`` when it is not a regular
    file (a FIFO or a device would block or never end) or holds more than ``max_bytes``.

    For files others can write (the registry): the caller verifies and parses exactly these bytes.
    """
    with _open_regular(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is over {max_bytes} bytes")
    return data


# True inside unsynced(): the new files copy_hashed and an object store's download write are not fsync'd.
_UNSYNCED: ContextVar[bool] = ContextVar("kit_unsynced", default=False)


@contextmanager
def unsynced() -> Iterator[None]:
    """Inside (this thread or task): the new files :func:`copy_hashed` and an object store's download write
    are left to the kernel, not fsync'd. Only for the verified cache's fills (:mod:`kit.registry.cache`):
    their seal records the boot they were written in and they are re-hashed after a reboot, the one event
    that loses bytes a process wrote. Every other write stays durable."""
    token = _UNSYNCED.set(True)
    try:
        yield
    finally:
        _UNSYNCED.reset(token)


def syncing() -> bool:
    """Whether a new file's bytes are fsync'd before it is used: always, except inside :func:`unsynced`."""
    return not _UNSYNCED.get()


def copy_hashed(src: Path, dst: Path, max_bytes: int, mode: int = 0o600) -> tuple[str, int]:
    """Copy the regular file ``src`` to a new file ``dst`` (``mode``, fsync'd unless inside :func:`unsynced`),
    hashing the bytes as they are copied; returns (sha256, size). One read of ``src``: what the digest names
    is what ``dst`` holds, whatever happens to ``src`` meanwhile. ``ValueError`` when ``src`` is not a
    regular file or grows past ``max_bytes``."""
    h = hashlib.sha256()
    size = 0
    with _open_regular(src) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"{src} is over {max_bytes} bytes")
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            if syncing():
                os.fsync(fout.fileno())
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so a service
        # running as another user can read a shared registry.
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line durably (callers hold the lock that orders appends)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (a write may create the folders below it)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still write on ``folder``'s file system."""
    st = os.statvfs(_existing(folder))
    return st.f_bavail * st.f_frsize


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def ensure_free_space(folder: Path, need: int, what: str) -> None:
    """``StorageError`` (one line naming ``folder`` and the space needed) unless ``need`` bytes (plus a
    small slack) are free there, or when the folder is read-only: checked *before* a write whose size is
    known, so a full disk refuses it whole instead of failing half-way (torch's archive writer aborts the
    process on ENOSPC)."""
    where = _existing(folder)
    try:
        st = os.statvfs(where)
    except OSError as exc:
        raise _storage_error(exc, folder, need, what) from exc
    if st.f_flag & os.ST_RDONLY:
        raise StorageError(f"Cannot write {what}: {folder} is on a read-only file system (mounted read-only). "
                           "Nothing was written; remount it read-write or point Kit at a writable folder.",
                           folder=str(folder), need=need)
    free = st.f_bavail * st.f_frsize
    if free < need + SPACE_SLACK:
        raise StorageError(
            f"Cannot write {what}: {folder} has {_human(free)} free and it needs {_human(need + SPACE_SLACK)}. "
            f"Nothing was written; free {_human(need + SPACE_SLACK - free)} there (or move it to a larger disk) "
            "and repeat.", folder=str(folder), need=need)


def _storage_error(exc: OSError, folder: Path, need: int | None, what: str) -> StorageError:
    state = _STORAGE_ERRNOS.get(exc.errno or 0, f"refused the write ({exc.strerror or exc})")
    needs = f" ({_human(need + SPACE_SLACK)} needed)" if need is not None else ""
    return StorageError(f"Cannot write {what}: {folder} {state}{needs}. Nothing was kept of the partial write; "
                        "free space or fix the folder and repeat.", folder=str(folder), need=need)


@contextmanager
def storage_errors(folder: Path, what: str, need: int | None = None) -> Iterator[None]:
    """Turn a storage's refusal of a write (full, quota, read-only, I/O error) inside the block into one
    ``StorageError`` line naming ``folder``; other errors pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise _storage_error(exc, folder, need, what) from exc
        raise


def sweep_stale(folder: Path, pattern: str, older_than: float, now: float | None = None) -> int:
    """Remove the regular files in ``folder`` matching ``pattern`` (a glob) last changed more than
    ``older_than`` seconds ago: temporary files of killed writers. Callers hold the lock writers take, so a
    file here is no live writer's (the age only spares a writer that does not take it). Links are removed,
    never followed; errors are ignored (another sweeper got there first). Returns how many went."""
    import time

    now = time.time() if now is None else now
    gone = 0
    for p in Path(folder).glob(pattern):
        try:
            st = os.lstat(p)
            if (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and now - st.st_mtime > older_than:
                os.unlink(p)
                gone += 1
        except OSError:
            continue
    return gone
