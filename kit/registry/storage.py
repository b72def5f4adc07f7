"""Where a registry's bytes live, behind one small interface: a local folder or an object store.

The registry's guarantees are built from the operations every S3-compatible store offers, so the same
rules hold on a folder and in a bucket, without locks:

- ``put_if_absent`` (S3: ``PUT`` with ``If-None-Match: *``; a folder: an exclusive link) claims a name once:
  two writers never both create version N's record or move serial N.
- ``get_if_changed`` (S3: ``GET`` with ``If-None-Match: <etag>``) is what a poller calls: a 304 costs one
  round trip and no body.
- ``download`` streams an object into a new local file while hashing it (one read: what the digest names
  is what the file holds); ``upload`` sends a local file (an object store: a big file named by its sha256
  goes as staged parts joined server-side, so a re-run sends only the parts missing: :mod:`kit.registry.s3parts`).

Keys are ``/``-separated paths relative to the registry's root (``digits/versions/3/meta.json``); each
implementation refuses keys that would leave it (``..``, absolute, empty parts).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kit._io import atomic_write_bytes, fsync_dir, read_capped
from kit.errors import RegistryCorruptError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Got:
    """An object's bytes and the tag a later ``get_if_changed`` compares against."""

    data: bytes
    etag: str


class NotModified:
    """``get_if_changed``'s answer when the object still has the tag the caller holds."""


NOT_MODIFIED = NotModified()


class Storage(Protocol):
    """The operations a registry needs from where its bytes live (see the module docstring)."""

    def describe(self) -> str: ...

    def get(self, key: str, max_bytes: int) -> Got | None: ...

    def get_if_changed(self, key: str, etag: str | None, max_bytes: int) -> Got | NotModified | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def sizes(self, prefix: str) -> dict[str, int]: ...

    def folders(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def download(self, key: str, dst: Path, max_bytes: int, progress: Progress | None = None) -> tuple[str, int]: ...

    def upload(self, key: str, src: Path, progress: Progress | None = None, *, sha256: str | None = None) -> None: ...


def check_key(key: str) -> str:
    """``key`` when it is a plain relative ``/`` path (no ``..``, no empty or hidden-dot parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
        raise RegistryCorruptError(f"Refusing the storage key {key[:120]!r}: not a plain relative path.")
    return key


def is_url(location: object) -> bool:
    """True for a registry location that names an object store (``s3://bucket/prefix``)."""
    return isinstance(location, str) and "://" in location


class FolderStorage:
    """A folder as :class:`Storage` (the registry's historic layout; files written atomically)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str, max_bytes: int) -> Got | None:
        try:
            data = read_capped(self._path(key), max_bytes)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryCorruptError(f"{self._path(key)} cannot be read ({exc}).") from exc
        return Got(data, hashlib.sha256(data).hexdigest())

    def get_if_changed(self, key: str, etag: str | None, max_bytes: int) -> Got | NotModified | None:
        got = self.get(key, max_bytes)
        return NOT_MODIFIED if got is not None and got.etag == etag else got

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: fails when the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Each key under ``prefix`` -> its size in bytes."""
        return {k: (self.root / k).stat().st_size for k in self.list_keys(prefix)}

    def folders(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def download(self, key: str, dst: Path, max_bytes: int, progress: Progress | None = None) -> tuple[str, int]:
        from kit._io import copy_hashed

        return copy_hashed(self._path(key), dst, max_bytes)

    def upload(self, key: str, src: Path, progress: Progress | None = None, *, sha256: str | None = None) -> None:
        atomic_write_bytes(self._path(key), Path(src).read_bytes())
