"""A local verified cache of registered versions: what loads map and parse, instead of the registry's files.

The registry's folder is untrusted storage (``docs/security.md``): anyone who can write it can swap a file
between the moment Kit hashes it and the moment torch maps it, truncate a file a worker has mapped
(SIGBUS), or delete a version a service still needs. So a load copies each file of a verified version
(:class:`kit.registry.loaded.VerifiedVersion`) into a private folder, hashing the bytes as it copies them
(one read), compares each digest with the verified meta.json, and publishes the folder atomically::

    <cache>/<artifact_sha256>-<meta_sha256[:16]>/   model.pt2, example.npz, [model.onnx, model.onnx.data],
                                                    meta.json (the verified bytes), .sealed (written last)

Files are 0400, folders 0700, all owned by the user that runs the load. The folder is named by the
artifact digest and by the digest of the meta.json that was verified, so a re-signed or re-registered
version never shares an entry it did not check. From then on the registry can change or vanish under a
served version without effect.

An entry found already there is trusted when it is ours: a folder (not a link) owned by this user, mode
0700, in a cache root owned by this user and not writable by others, with a ``.sealed`` record (written
last, before the atomic rename) naming exactly the verified files and their sha256, and every file's size
and mtime as sealed. Re-hashing is not repeated on a hit: only this user (or root) can write the entry,
and whoever runs as this user can already change the service's own code; the stamp catches accidents (a
file truncated or replaced by hand). A hit costs one stat per file.

Durability by boot, not fsync. An entry's files are written without fsync (a 400 MB download is then bound
by the wire, not the disk's flush): bytes a process wrote reach the disk even if it is killed, and are lost
only by a crash or power loss of the machine, which means a new boot. So the seal records the boot it was
written in (:func:`boot_id`, Linux's ``/proc/sys/kernel/random/boot_id``, the host's in a container). A hit
in the same boot is trusted as above; a hit from another boot re-hashes every file against the seal (one
read each; the files may be torn or zeroed with their size and mtime intact) and compares meta.json with
the verified bytes: all equal, the seal is rewritten for this boot (atomically) and the entry used; any
different, the entry is discarded and built again (one worker does either, under the entry's lock). Where
no boot id can be read, every file, the seal, the entry's folder (before the rename) and the cache root
(after it) are fsync'd, and the seal names no boot (as Kit's seals before this did: such an entry is trusted
in any boot).

Location (:func:`default_cache_dir`): ``KIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kit``, else
``~/.cache/kit``; versions loaded by the library go to ``versions/`` under it, a service's to
``services/<service>/`` (a folder per service). :meth:`VersionCache.prune` bounds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

from kit._io import copy_hashed, fsync_dir, read_capped, sha256_file, unsynced
from kit._proc import pid_alive
from kit._types import JSONObject
from kit.errors import ConfigError, IntegrityError, UnsafeArtifactError
from kit.registry.loaded import VerifiedVersion
from kit.registry.names import is_sha256_hex

log = logging.getLogger(__name__)

SEAL = ".sealed"
META = "meta.json"
_KEY = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This boot of the machine (Linux's random boot id; a container reads its host's), or None where there is
    none. Bytes written and not fsync'd can only be lost by a crash of the machine, which ends the boot."""
    try:
        got = BOOT_ID.read_bytes()[:64].decode("ascii").strip()
    except (OSError, UnicodeError):
        return None
    return got or None


def default_cache_dir(service: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """Where loads cache verified versions: ``KIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kit``, else
    ``~/.cache/kit``; then ``versions/``, or ``services/<service>/`` for a service's own folder.

    Like the key folder's default, a per-user location: read from the environment here, the one place.
    """
    env = os.environ if environ is None else environ
    base = env.get("KIT_CACHE_DIR") or (str(Path(env["XDG_CACHE_HOME"]) / "kit") if env.get("XDG_CACHE_HOME")
                                        else str(Path.home() / ".cache" / "kit"))
    return Path(base).expanduser() / ("versions" if service is None else Path("services") / service)


def safe_file_name(fname: str) -> bool:
    """A version's file name as meta.json may list it: one plain name in the version folder."""
    return bool(fname) and "/" not in fname and "\\" not in fname and not fname.startswith(".") and "\0" not in fname


# (registry path of a file, new local file, size limit) -> (sha256, size) of exactly the bytes written there
Fetch = Callable[[Path, Path, int], tuple[str, int]]


class VersionCache:
    """A cache folder of verified versions (see the module docstring).

    ``fetch`` copies one file of the registry into the cache while hashing it: a local copy by default; a
    registry on an object store streams the object (:mod:`kit.registry.remote`)."""

    def __init__(self, root: Path | str, fetch: Fetch | None = None):
        self.root = Path(root).expanduser().absolute()
        self.fetch: Fetch = fetch or _copy_local

    def __repr__(self) -> str:
        return f"VersionCache({str(self.root)!r})"

    @staticmethod
    def key(vv: VerifiedVersion) -> str:
        art = vv.version.artifact_sha256
        if not is_sha256_hex(art):
            raise IntegrityError(f"{vv.version.ref}: meta.json's artifact_sha256 {str(art)[:70]!r} is not a sha256 "
                                 "digest. Restore the version from a copy you trust or register the model again.")
        return f"{art}-{vv.meta_sha256[:16]}"

    # ---- the one entry point loads use
    def materialize(self, vv: VerifiedVersion, max_file_bytes: int) -> Path:
        """The folder holding ``vv``'s files as verified: an entry found sealed and ours, else one made now
        by copying each file from the registry while hashing it. ``IntegrityError`` (the entry discarded)
        when a copied file's sha256 is not the one the verified meta.json records."""
        key = self.key(vv)
        entry = self.root / key
        self._ensure_root()
        if self._usable(entry, vv, rehash=False):
            _touch(entry)
            return entry
        with self._key_lock(key):
            if self._usable(entry, vv, rehash=True):  # another worker built it meanwhile, or it survived a reboot
                _touch(entry)
                return entry
            if os.path.lexists(entry):
                log.warning("discarding cache entry %s: not sealed, not ours, or changed since sealed", entry)
                self._discard(entry)
            t0 = time.perf_counter()
            self._build(vv, entry, max_file_bytes)
        log.info("cached %s in %s (%.2fs)", vv.version.ref, entry, time.perf_counter() - t0)
        return entry

    def _build(self, vv: VerifiedVersion, entry: Path, max_file_bytes: int) -> None:
        mv = vv.version
        boot = boot_id()  # known: nothing is fsync'd, the seal names the boot; else everything is
        tmp = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        try:
            sealed: dict[str, dict[str, object]] = {}
            with unsynced() if boot else nullcontext():
                for fname, expected in sorted(mv.files.items()):
                    if not safe_file_name(fname):
                        raise IntegrityError(f"{mv.ref}: meta.json lists an unsafe file name {fname!r}. Restore "
                                             "the version from a copy you trust or register the model again.")
                    sealed[fname] = self._copy_one(mv.ref, mv.path / fname, tmp / fname, expected, max_file_bytes)
            _write_private(tmp / META, vv.meta, sync=not boot)
            seal = {"format": "kit-cache", "schema": 1, "key": entry.name, "ref": mv.ref,
                    "registry": str(mv.path), "files": sealed, **({"boot_id": boot} if boot else {})}
            _write_private(tmp / SEAL, json.dumps(seal, sort_keys=True).encode(), sync=not boot)  # last
            if not boot:
                fsync_dir(tmp)
            os.rename(tmp, entry)  # atomic: the entry appears whole or not at all
            if not boot:
                fsync_dir(self.root)
        except BaseException:
            self._discard(tmp)
            raise

    def _copy_one(self, ref: str, src: Path, dst: Path, expected: str, max_bytes: int) -> dict[str, object]:
        try:
            got, size = self.fetch(src, dst, max_bytes)
        except FileNotFoundError as exc:
            raise IntegrityError(f"Refusing to load {ref}: {src.name}: missing from {src.parent}. Restore it "
                                 "or register the model again.") from exc
        except ValueError as exc:  # over the size a version's file may have: refused before it is read whole
            raise UnsafeArtifactError(
                f"Refusing to load {ref}: {src.name} is over the limit of {max_bytes} bytes ([model] "
                "max_artifact_bytes in service.toml). Raise the limit if the file is yours, or restore the "
                "version.") from exc
        if got != expected:
            raise IntegrityError(
                f"Refusing to load {ref}: {src.name}: sha256 {got[:12]}… != recorded {str(expected)[:12]}… (the "
                "file was changed after registration, or while it was being read). Restore it or register the "
                "model again.")
        os.chmod(dst, 0o400)
        st = os.stat(dst)
        return {"sha256": got, "size": size, "mtime_ns": st.st_mtime_ns}

    @contextmanager
    def private_dir(self) -> Iterator[Path]:
        """A fresh folder in the cache root (0700, this user's), removed afterwards: where ``register``
        saves a model before copying it into the registry."""
        self._ensure_root()
        tmp = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- trusting what is there
    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(self.root)
        except OSError as exc:
            raise ConfigError(f"Cannot use the version cache {self.root} ({exc.strerror or exc}). Point "
                              "KIT_CACHE_DIR at a folder this user can write.") from exc
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"The version cache {self.root} is not a folder owned by this user (uid "
                              f"{os.geteuid()}); loads trust only a cache they own. Point KIT_CACHE_DIR at one.")
        if st.st_mode & 0o077:
            os.chmod(self.root, 0o700)

    def _usable(self, entry: Path, vv: VerifiedVersion, rehash: bool) -> bool:
        """True when ``entry`` is sealed for ``vv`` (:meth:`_sealed`) and its files are known whole: sealed in
        this boot or fsync'd (a seal naming no boot), else, with ``rehash``, re-hashed now (:meth:`_reverify`)."""
        seal = self._sealed(entry, vv)
        if seal is None:
            return False
        if seal.get("boot_id") is None or seal["boot_id"] == boot_id():
            return True
        return rehash and self._reverify(entry, vv, seal)

    @staticmethod
    def _sealed(entry: Path, vv: VerifiedVersion) -> JSONObject | None:
        """The seal of ``entry`` when it is ours and sealed for exactly ``vv``'s files, each as it was sealed."""
        try:
            st = os.lstat(entry)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                return None
            seal = json.loads(read_capped(entry / SEAL, 1 << 20))
            files = seal["files"]
            if seal.get("key") != entry.name or set(files) != set(vv.version.files):
                return None
            for fname, expected in vv.version.files.items():
                rec = files[fname]
                fst = os.lstat(entry / fname)
                if (rec["sha256"] != expected or not stat.S_ISREG(fst.st_mode) or fst.st_uid != os.geteuid()
                        or fst.st_size != rec["size"] or fst.st_mtime_ns != rec["mtime_ns"]):
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return seal if isinstance(seal, dict) else None

    @staticmethod
    def _reverify(entry: Path, vv: VerifiedVersion, seal: JSONObject) -> bool:
        """``entry`` sealed in another boot: its files were not fsync'd, and a crash may have torn or zeroed them
        with their size and mtime intact. Each is re-hashed (one read) against the seal and meta.json compared
        with the verified bytes; all equal, the seal is rewritten for this boot (atomically) and True; else
        False (the caller rebuilds it). Where this boot has no id, False: rebuilt, fsync'd."""
        boot = boot_id()
        if boot is None:
            return False
        t0 = time.perf_counter()
        try:  # the seal names exactly these files and digests (_sealed)
            whole = (all(sha256_file(entry / f) == want for f, want in sorted(vv.version.files.items()))
                     and read_capped(entry / META, len(vv.meta)) == vv.meta)
            if whole:
                tmp = entry / f"{SEAL}.{uuid.uuid4().hex[:8]}.tmp"
                _write_private(tmp, json.dumps({**seal, "boot_id": boot}, sort_keys=True).encode(), sync=False)
                os.replace(tmp, entry / SEAL)
        except (OSError, ValueError):
            whole = False
        if not whole:
            log.warning("cache entry %s: a file is not as sealed after a reboot (torn by a crash?)", entry)
            return False
        log.info("re-verified cache entry %s after a reboot (%.2fs): every file re-hashed, sealed for this boot",
                 entry, time.perf_counter() - t0)
        return True

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """One builder per entry across this host's processes (the others wait, then find it sealed)."""
        fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _discard(self, path: Path) -> None:
        """Move ``path`` aside (atomic) and remove it; a worker that mapped its files keeps its mapping."""
        trash = self.root / f".trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            trash = path
        if trash.is_symlink() or not trash.is_dir():
            trash.unlink(missing_ok=True)
        else:
            shutil.rmtree(trash, ignore_errors=True)

    # ---- bounding it
    def entries(self) -> list[Path]:
        """The sealed-looking entries, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _KEY.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def prune(self, keep_artifacts: Iterable[str] = (), unused_for_s: float = 0.0) -> list[Path]:
        """Remove entries whose artifact is not in ``keep_artifacts`` and that no load used for
        ``unused_for_s`` seconds, plus debris of dead builders; returns what was removed. An entry being
        built is skipped; removing one a running worker has mapped is safe (the mapping keeps its pages)."""
        keep = set(keep_artifacts)
        removed: list[Path] = []
        now = time.time()
        for entry in self.entries():
            if entry.name.split("-", 1)[0] in keep or now - entry.stat().st_mtime < unused_for_s:
                continue
            lock = self.root / f".{entry.name}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._discard(entry)  # its lock file stays: a builder may hold it open
                removed.append(entry)
            finally:
                os.close(fd)
        for p in list(self.root.glob(".tmp-*")) + list(self.root.glob(".trash-*")) if self.root.is_dir() else []:
            pid = p.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
        return removed


def _copy_local(src: Path, dst: Path, max_bytes: int) -> tuple[str, int]:
    return copy_hashed(src, dst, max_bytes)


def _write_private(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _touch(entry: Path) -> None:
    """Record a use (the entry folder's mtime), for :meth:`VersionCache.prune`; best effort."""
    try:
        os.utime(entry)
    except OSError:
        pass
