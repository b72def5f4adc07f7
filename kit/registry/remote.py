"""A registry whose source of truth is an object store (``s3://bucket/prefix``), without locks.

Layout in the bucket (the folder registry's, plus the claims)::

    <name>/claims/<n>.json            created with If-None-Match: * -- whoever creates it owns number n
    <name>/versions/<n>/<file>        uploaded first (big files: parts staged, then joined; kit.registry.s3parts)
    <name>/versions/<n>/meta.json.sig then the signature
    <name>/versions/<n>/meta.json     last, created with If-None-Match: *: the record that makes n visible
    <name>/moves/<serial>.json        signed move records, each created with If-None-Match: *
    <name>/aliases.json               a copy of the newest record (what services poll, with ETags)
    <name>/events/<ts>-<id>.json      one object per audit event (an object store cannot append)
    _uploads/<sha256>/<size>/<i>      a big file's parts, staged while it uploads (a re-run resumes them)

A version number is taken by the claim, so two writers on two machines never share one; a number whose
writer died after claiming stays a gap (listed by no one, never reused). Moves are the same conditional
create of the next serial (:mod:`kit.registry.moves`): the loser is told to look again and repeat.

Readers keep a per-host mirror of the small objects (meta.json, its signature, events) under the cache
folder, so the checks written for the folder registry run unchanged on the same bytes; the big files are
never mirrored: a load streams each one from the bucket into the local verified cache while hashing it
(:mod:`kit.registry.cache`), once per host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._io import atomic_write_bytes, copy_hashed
from kit._types import JSONObject
from kit.errors import (
    ConfigError,
    IntegrityError,
    KitError,
    ModelNotFoundError,
    RegistryCorruptError,
    UnsafeArtifactError,
    VersionNotFoundError,
)
from kit.evidence import RESULT_FILE
from kit.progress import Steps
from kit.registry.aliases import AliasMoves
from kit.registry.cache import VersionCache, default_cache_dir, safe_file_name
from kit.registry.loaded import VerifiedVersion
from kit.registry.moves import MAX_RECORD_BYTES, MoveStorage
from kit.registry.names import is_version_text, validate_name
from kit.registry.records import ModelVersion, VerifyResult, utcnow
from kit.registry.storage import FolderStorage, Got, NotModified, Storage, is_url
from kit.registry.store import CONFIGURED, resolve_keyring
from kit.signing import SIG_SUFFIX, SigningKey, sign_file

if TYPE_CHECKING:
    from kit.registry.movelog import MoveLog

log = logging.getLogger(__name__)

MAX_META_BYTES = 4 << 20
MAX_EVIDENCE_BYTES = 256 << 20  # one file of a gate run (report.html, executed notebooks, logs)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_FILE_BYTES = 32 << 30  # what a check downloads at most per file (a load applies its own, smaller limit)
_MAX_CLAIM_TRIES = 1000


def mirror_dir(storage: Storage, cache_root: Path) -> Path:
    """This host's folder of copies of ``storage``'s small objects, inside the (0700, this user's) cache root:
    ``<cache>/.remote/<digest of the store's identity>``."""
    ident = storage.identity() if hasattr(storage, "identity") else storage.describe()
    return Path(cache_root).expanduser().absolute() / ".remote" / hashlib.sha256(ident.encode()).hexdigest()[:20]



def open_storage(location: str | os.PathLike[str]) -> Storage:
    """The storage at ``location``: ``s3://bucket/prefix`` (:mod:`kit.registry.s3`) or a folder."""
    if is_url(location):
        text = str(location)
        if not text.startswith("s3://"):
            raise ConfigError(f"Unsupported registry URL {text!r}: Kit reads registries from folders and from "
                              "s3://bucket/prefix (any S3-compatible store).")
        from kit.registry.s3 import S3Storage  # the client library only when a bucket is named

        return S3Storage.from_url(text)
    return FolderStorage(Path(location))

class ObjectMoveStorage(MoveStorage):
    """A model's move records in an object store: ``create`` is a PUT with If-None-Match: *, and the
    pointer (aliases.json) is read with If-None-Match: <etag>, so an unchanged poll costs no body."""

    def __init__(self, storage: Storage, name: str, mirror: Path):
        super().__init__(mirror / name)
        self.storage, self.name = storage, name
        self._pointer: Got | None = None

    def _key(self, serial: int) -> str:
        return f"{self.name}/moves/{serial:08d}.json"

    def read(self, serial: int) -> bytes | None:
        got = self.storage.get(self._key(serial), MAX_RECORD_BYTES)
        return got.data if got is not None else None

    def read_pointer(self) -> bytes | None:
        held = self._pointer
        got = self.storage.get_if_changed(f"{self.name}/aliases.json", held.etag if held else None, MAX_RECORD_BYTES)
        if isinstance(got, NotModified):
            return held.data if held is not None else None
        self._pointer = got
        return got.data if got is not None else None

    def serials(self) -> list[int]:
        out = []
        for key in self.storage.list_keys(f"{self.name}/moves/"):
            n = key.rsplit("/", 1)[-1]
            if n.endswith(".json") and len(n) == 13 and n[:8].isascii() and n[:8].isdigit():
                out.append(int(n[:8]))
        return sorted(out)

    def create(self, serial: int, data: bytes) -> bool:
        return self.storage.put_if_absent(self._key(serial), data)

    def write_pointer(self, data: bytes) -> None:
        self.storage.put(f"{self.name}/aliases.json", data)

    def remove_pointer(self) -> None:
        self.storage.delete(f"{self.name}/aliases.json")
        self._pointer = None
        super().remove_pointer()


class ObjectStoreMixin(AliasMoves):
    """The :class:`kit.registry.store.Store` methods that differ on an object store (module docstring).

    Placed before :class:`kit.registry.Registry` in a subclass's bases; everything else (signature checks,
    the gate rule, alias moves) runs unchanged over the bytes these methods read.
    """

    def __init__(self, root: Path | str, **kwargs: Any):
        storage = open_storage(root)
        self.url, self.storage = storage.describe(), storage
        kwargs["keyring"] = resolve_keyring(kwargs.get("keyring", CONFIGURED), self.url)  # the bucket's URL
        cache_root = kwargs.pop("cache_dir", None) or default_cache_dir()
        super().__init__(mirror_dir(storage, cache_root), cache_dir=cache_root, **kwargs)
        self.cache = VersionCache(self.cache.root, fetch=self._fetch)

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    @property
    def location(self) -> str:
        """The bucket's URL: what a service on another host names (``root`` is this host's mirror)."""
        return str(self.url)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _fetch(self, src: Path, dst: Path, max_bytes: int) -> tuple[str, int]:
        """The cache's reader: the object behind mirror path ``src`` streamed into ``dst`` while hashed."""
        return self.storage.download(self._key(src), dst, max_bytes)

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """No lock: numbering and moves are conditional creates (a writer that loses is told to repeat)."""
        validate_name(name)
        with nullcontext():
            yield

    def aliases_path(self, name: str) -> Path:
        """This host's copy of ``name``'s aliases.json, brought in step first with one conditional GET (a
        304 when nothing moved). A service's watcher stats this path on every poll, so a move in the bucket
        changes what it stats; while the store is unreachable the copy is removed, so the watcher re-reads,
        keeps serving what it has and says why on /readyz (:mod:`kit.serving.slots`)."""
        path = super().aliases_path(name)
        try:
            data = self.movelog(name).storage.read_pointer()
        except KitError as exc:
            log.warning("%s: %s", name, exc)
            data = None
        try:
            held = path.read_bytes() if path.is_file() else None
        except OSError:
            held = None
        if data is None:
            path.unlink(missing_ok=True)
        elif data != held:
            atomic_write_bytes(path, data)
        return path

    # ---- reading
    def models(self) -> list[str]:
        from kit.registry.names import NAME_RE

        return [n for n in self.storage.folders("") if NAME_RE.fullmatch(n)]

    def _version_numbers(self, name: str) -> list[int]:
        out = set()
        for key in self.storage.list_keys(f"{validate_name(name)}/versions/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "meta.json" and is_version_text(parts[2]):
                out.add(int(parts[2]))
        return sorted(out)

    def _read_version(self, name: str, version: int) -> ModelVersion:
        """The listing's read of a version; one registered before meta.json recorded its files' sizes gets
        them from one LIST of its folder (sizes shown without downloading it)."""
        mv = super()._read_version(name, version)
        if set(mv.files) <= set(mv.file_sizes):
            return mv
        prefix = f"{name}/versions/{version}/"
        listed = self.storage.sizes(prefix)
        return dataclasses.replace(mv, file_sizes={f: listed[prefix + f] for f in mv.files if prefix + f in listed})

    def _require_model(self, name: str) -> None:
        if not self._version_numbers(name):
            have = ", ".join(self.models()) or "none"
            raise ModelNotFoundError(f"No model {name!r} in the registry at {self.url} (models: {have}). Register "
                                     "one with kit.registry.Registry.register() or %deploy.")

    def _meta_bytes(self, name: str, version: int) -> bytes:
        """meta.json's bytes, read once from the bucket; it and its signature are mirrored beside each other
        so the folder registry's checks read them where they expect them."""
        vdir = self.version_dir(name, version)
        got = self.storage.get(self._key(vdir / "meta.json"), MAX_META_BYTES)
        if got is None:
            raise VersionNotFoundError(self._no_version_msg(name, version))
        sig = self.storage.get(self._key(vdir / ("meta.json" + SIG_SUFFIX)), MAX_RECORD_BYTES)
        atomic_write_bytes(vdir / "meta.json", got.data)
        if sig is not None:
            atomic_write_bytes(vdir / ("meta.json" + SIG_SUFFIX), sig.data)
        else:
            (vdir / ("meta.json" + SIG_SUFFIX)).unlink(missing_ok=True)
        return got.data

    def movelog(self, name: str) -> MoveLog:
        from kit.registry.movelog import MoveLog

        log_ = self._movelogs.get(name)
        if log_ is None:
            log_ = MoveLog(name, ObjectMoveStorage(self.storage, validate_name(name), self.root),
                           self._move_trust, lambda v, g, a: self._gate_problem(name, v, g, a))
            self._movelogs[name] = log_
        return log_

    def history(self, name: str) -> list[JSONObject]:
        """The folder registry's history, over this host's copies of the bucket's event objects (each one
        fetched once: events are never rewritten)."""
        lines = []
        for key in self.storage.list_keys(f"{validate_name(name)}/events/"):
            local = self.root / key
            if len(key.split("/")) != 3 or not safe_file_name(local.name):
                continue
            if not local.is_file():
                got = self.storage.get(key, MAX_RECORD_BYTES)
                if got is None:
                    continue
                atomic_write_bytes(local, got.data)
            lines.append(local.read_bytes()[:MAX_RECORD_BYTES].decode("utf-8", "replace").strip())
        atomic_write_bytes(self.events_path(name), ("\n".join(lines) + "\n").encode() if lines else b"")
        return super().history(name)

    # ---- checking: the files are in the bucket, so a check is a download into the verified cache
    def check_integrity(self, mv: ModelVersion) -> str | None:
        """Signature of meta.json, then every file streamed into the local verified cache while hashed (a
        hit on this host costs one stat per file)."""
        vv = self._verified_as(mv)
        self.cache.materialize(vv, MAX_FILE_BYTES)
        return vv.signed_by

    def _verify_one(self, name: str, version: int) -> VerifyResult:
        ref = f"{name}@{version}"
        try:
            vv = self.verified(name, version)
            self.check_integrity(vv.version)
        except (IntegrityError, UnsafeArtifactError, KitError) as exc:
            return VerifyResult(ref, False, (str(exc),))
        return VerifyResult(ref, True, (), vv.signed_by)

    def verified(self, name: str, ref: int | str | None = None) -> VerifiedVersion:
        """:meth:`kit.registry.integrity.CheckedStore.verified`, and the version's files made whole in this host's copy: streamed
        into the local verified cache while hashed (once per host), then linked beside the mirrored meta.json,
        so what checks and gate notebooks read from :attr:`root` is a whole, verified folder registry."""
        vv = super().verified(name, ref)
        entry = self.cache.materialize(vv, MAX_FILE_BYTES)
        vdir = vv.version.path
        for fname in vv.version.files:
            dst = vdir / fname
            try:
                if os.path.samefile(entry / fname, dst):
                    continue
            except OSError:
                pass
            tmp = vdir / f".{fname}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                os.link(entry / fname, tmp)  # the cache root holds the mirror: one file system
            except OSError:
                copy_hashed(entry / fname, tmp, MAX_FILE_BYTES)
            os.replace(tmp, dst)
        return vv

    # ---- gate evidence: written here by the gate, uploaded when its event is recorded; synced before reads
    def record_event(self, name: str, event: str, **fields: Any) -> JSONObject:
        if event == "gate" and fields.get("run_id") is not None:
            self._upload_run(name, int(fields["version"]), str(fields["run_id"]))
        return super().record_event(name, event, **fields)

    def _upload_run(self, name: str, version: int, run_id: str) -> None:
        """A gate run's evidence folder sent to the bucket: the files, the signature, result.json last (its
        presence means the run is whole, as in a folder)."""
        run = self.gate_root(name, version) / _run_id(run_id)
        order = sorted((p for p in run.iterdir() if p.is_file() and not p.is_symlink() and safe_file_name(p.name)),
                       key=lambda p: (p.name == RESULT_FILE, p.name.endswith(SIG_SUFFIX), p.name))
        for p in order:
            self.storage.upload(self._key(p), p)

    def _sync_gates(self, name: str, version: int) -> None:
        """Copy the bucket's whole gate runs of ``name@version`` that this host has not seen (each file
        size-capped; result.json last). What they say is checked where it is read (signatures, hashes)."""
        root = self.gate_root(name, version)
        runs: dict[str, list[str]] = {}
        for key in self.storage.list_keys(f"{name}/versions/{version}/gates/"):
            parts = key.split("/")
            if len(parts) == 6 and _RUN_ID.fullmatch(parts[4]) and safe_file_name(parts[5]):
                runs.setdefault(parts[4], []).append(parts[5])
        for run_id, files in runs.items():
            if RESULT_FILE not in files or (root / run_id / RESULT_FILE).is_file():
                continue
            for fname in sorted(files, key=lambda f: f == RESULT_FILE):
                got = self.storage.get(f"{name}/versions/{version}/gates/{run_id}/{fname}", MAX_EVIDENCE_BYTES)
                if got is not None:
                    atomic_write_bytes(root / run_id / fname, got.data)

    def gate_results(self, name: str, version: int) -> list[JSONObject]:
        self._sync_gates(name, version)
        return super().gate_results(name, version)

    def _signed_gate_results(self, mv: ModelVersion) -> list[JSONObject]:
        self._sync_gates(mv.name, mv.version)
        return super()._signed_gate_results(mv)

    def _gate_problem(self, name: str, version: int, gate: JSONObject, artifact_sha256: str) -> str | None:
        self._sync_gates(name, version)
        return super()._gate_problem(name, version, gate, artifact_sha256)

    # ---- signing in place, and the guard keys' registrations: written here, then uploaded
    def sign_version(self, name: str, version: int) -> str:
        """:meth:`kit.registry.integrity.CheckedStore.sign_version` over this host's copy: the version's files are streamed from the
        bucket into it while hashed, checked against meta.json and signed there; meta.json (when it gained its
        name and version) and its signature are then uploaded."""
        version = self._resolve_number(name, version)
        mv = self._parse_meta(name, version, self._meta_bytes(name, version))
        for fname in sorted(mv.files):
            if not safe_file_name(fname):
                continue  # named as a problem by the check that follows
            tmp = mv.path / f".{fname}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                self.storage.download(self._key(mv.path / fname), tmp, MAX_FILE_BYTES)
                os.replace(tmp, mv.path / fname)
            except FileNotFoundError:
                (mv.path / fname).unlink(missing_ok=True)  # the check names it missing
            finally:
                tmp.unlink(missing_ok=True)
        return super().sign_version(name, version)

    def _write_signed_meta(self, name: str, version: int, data: bytes, key: SigningKey) -> None:
        super()._write_signed_meta(name, version, data, key)
        meta = self.version_dir(name, version) / "meta.json"
        got = self.storage.get(self._key(meta), MAX_META_BYTES)
        if got is None or got.data != data:  # meta.json first: until its signature follows, it reads unsigned
            self.storage.put(self._key(meta), data)
        self.storage.put(self._key(meta) + SIG_SUFFIX, (meta.parent / (meta.name + SIG_SUFFIX)).read_bytes())

    def register_guard_key(self, name: str, public_key: str, *, service: str, steps: list[float],
                           user: str | None = None) -> Path:
        """The signed registration written as in a folder, then uploaded: writers on any host delegate to it."""
        path = super().register_guard_key(name, public_key, service=service, steps=steps, user=user)
        self.storage.put(self._key(path), path.read_bytes())
        return path

    def guard_keys(self, name: str) -> JSONObject:
        """The bucket's guard key registrations of ``name`` (this host's copy made the same first: added,
        replaced, and removed where the bucket no longer has one), checked as in a folder."""
        folder = self.model_dir(name) / "guards"
        keys = {k.rsplit("/", 1)[-1]: k for k in self.storage.list_keys(f"{validate_name(name)}/guards/")}
        for local in folder.glob("*.json") if folder.is_dir() else []:
            if local.name not in keys:
                local.unlink(missing_ok=True)
        for fname, key in keys.items():
            got = self.storage.get(key, MAX_RECORD_BYTES) if safe_file_name(fname) and key.count("/") == 2 else None
            if got is not None:
                atomic_write_bytes(folder / fname, got.data)
        return super().guard_keys(name)

    # ---- writing
    def _publish(self, name: str, tmp: Path, meta: JSONObject, signer: SigningKey | None, steps: Steps) -> int:
        """Claim the next number (conditional create), upload the files, then the signature and meta.json
        (whose ``capture.steps`` gains the upload's seconds)."""
        with steps.step("upload", f"to {self.url}"):
            version = self._claim(name)
            prefix = f"{name}/versions/{version}"
            for fname in sorted(meta["files"]):
                if not safe_file_name(fname):
                    raise IntegrityError(f"Refusing to upload {fname!r}: not a plain file name.")
                self.storage.upload(f"{prefix}/{fname}", tmp / fname, steps.meter("upload", f"{prefix}/{fname}"),
                                    sha256=meta["files"][fname])  # a re-run of a killed upload sends what is missing
        meta["capture"].setdefault("steps", {})["upload"] = steps.seconds["upload"]
        with steps.step("publish", "signature, meta.json"):
            meta["version"] = version
            data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
            atomic_write_bytes(tmp / "meta.json", data)
            if signer is not None:
                sign_file(tmp / "meta.json", signer, data=data)
                self.storage.put(f"{prefix}/meta.json{SIG_SUFFIX}", (tmp / f"meta.json{SIG_SUFFIX}").read_bytes())
            if not self.storage.put_if_absent(f"{prefix}/meta.json", data):
                raise IntegrityError(f"{name}@{version}'s meta.json appeared while this writer held the claim to "
                                     "it: someone writes the bucket without claiming. Nothing of it was made visible.")
            self._event(name, "register", version=version, artifact_sha256=meta["artifact_sha256"])
        return version

    def _claim(self, name: str) -> int:
        nums = self._version_numbers(name)
        claimed = [int(k.rsplit("/", 1)[-1][:-5]) for k in self.storage.list_keys(f"{name}/claims/")
                   if k.endswith(".json") and k.rsplit("/", 1)[-1][:-5].isdigit()]
        n = max([0, *nums, *claimed]) + 1
        body = json.dumps({"ts": utcnow(), "host": socket.gethostname(), "pid": os.getpid(),
                           "user": getattr(self, "user", None)}).encode()
        for _ in range(_MAX_CLAIM_TRIES):
            if self.storage.put_if_absent(f"{name}/claims/{n}.json", body):
                return n
            n += 1
        raise KitError(f"Could not claim a version number of {name!r} after {_MAX_CLAIM_TRIES} tries; "
                       "retry the register.")

    def _event(self, name: str, event: str, **fields: object) -> JSONObject:
        rec: JSONObject = {"ts": utcnow(), "event": event, "name": name, "user": fields.pop("user", None) or self.user}
        rec.update(fields)
        key = f"{name}/events/{rec['ts'].replace(':', '')}-{uuid.uuid4().hex[:12]}.json"
        self.storage.put(key, json.dumps(rec, sort_keys=True).encode())
        return rec


def _run_id(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise RegistryCorruptError(f"Refusing the gate run id {run_id[:80]!r}: not a plain run id.")
    return run_id
