"""A registry's storage: its folders, the per-model lock, reading versions and aliases, registering a
version, and the append-only audit log.

Layout (one folder per model name)::

    <root>/<name>/versions/<n>/      model.pt2, example.npz, [model.onnx, model.onnx.data], meta.json,
                                     gates/<run-id>/...
    <root>/<name>/aliases.json       {"production": {"version": 3, "previous": [1, 2]},
                                      "canary": {"version": 4, "weight": 0.1}, "serial": 7, ...}
    <root>/<name>/events.jsonl       register, gate, promote, canary, rollback (who, when, why)
    <root>/<name>/.lock              cross-process lock for numbering, aliases and events

A version is built in a hidden temporary folder and renamed into place when whole, so a crash at any
point leaves either no version or a whole one. ``aliases.json`` is replaced atomically and is the one
source of truth for what is served.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from kit._io import append_line, atomic_write_bytes, copy_hashed, file_mode, fsync_dir, read_capped, storage_errors
from kit._proc import pid_alive
from kit._types import JSONObject
from kit.errors import (
    ConfigError,
    IntegrityError,
    KitError,
    ModelNotFoundError,
    RegistryCorruptError,
    VersionNotFoundError,
)
from kit.progress import Progress, Steps
from kit.registry.cache import VersionCache, default_cache_dir
from kit.registry.lineage import detect_source
from kit.registry.movelog import MoveLog, move_event
from kit.registry.moves import MoveStorage
from kit.registry.names import ALIASES, NAME_RE, is_version_text, parse_ref, validate_name, validate_version
from kit.registry.preflight import refuse_object_fuse
from kit.registry.records import SCHEMA, Aliases, ModelVersion, artifact_digest, read_file_sizes, utcnow
from kit.registry.space import check_register_space
from kit.signing import Keyring, SigningKey, Trust, sign_file

if TYPE_CHECKING:
    from torch import nn

    from kit.capture import CapturedModel
    from kit.config import KitConfig

log = logging.getLogger(__name__)

_LOCK_TIMEOUT = 60.0
MAX_META_BYTES = 4 << 20  # meta.json is ~30 KB (the environment's package list); a bigger one is refused


CONFIGURED = "configured"  # Registry(path)'s default keyring: the user's (configured_keyring)


def configured_keyring(location: Path | str) -> Keyring:
    """The keyring a registry at ``location`` signs with when none is named: the one ``Registry.from_config``
    uses (``kit.config.load_config``: ``KIT_KEYS_DIR``, else kit.toml's ``keys_dir``, else
    ``~/.config/kit/keys``; ``signing_key`` and ``trusted_keys`` likewise). Its signing key is made (with
    a warning that says where) the first time something is signed, never by a reader."""
    from kit.config import load_config

    return cast(Keyring, load_config(registry=location).keyring())


def resolve_keyring(keyring: Keyring | None | str, location: Path | str) -> Keyring | None:
    """``keyring`` as given, or the configured one for ``"configured"`` (see :class:`Store`)."""
    if not isinstance(keyring, str):
        return keyring
    if keyring != CONFIGURED:
        raise ConfigError(f"keyring must be a kit.signing.Keyring, None (an unsigned registry) or {CONFIGURED!r} "
                          f"(the user's keys), got {keyring!r}.")
    return configured_keyring(location)


class Store:
    """A registry's folders (see the module docstring): layout, lock, reading, register, audit log.

    :class:`kit.registry.Registry` adds the integrity checks (:mod:`kit.registry.integrity`) and the alias
    moves (:mod:`kit.registry.aliases`) on top.
    """

    def __init__(self, root: Path | str, *, require_gate: bool = True, user: str | None = None,
                 keyring: Keyring | None | str = CONFIGURED, cache_dir: Path | str | None = None):
        """``keyring`` signs what this registry writes (meta.json, gate results, move records) and is the
        trust every read checks signatures against. Left out (``"configured"``): the user's keyring, by
        the rule :meth:`from_config` uses (:func:`configured_keyring`). ``None``: an unsigned registry,
        nothing signed or signature-checked (sha256 only), for tests of unsigned or legacy registries.
        ``cache_dir``: the local verified cache loads read from (default: ``default_cache_dir()``)."""
        self.root = Path(root).resolve()
        self.cache = VersionCache(cache_dir if cache_dir is not None else default_cache_dir())
        self.require_gate = require_gate
        self.user = user or "unknown"
        self.keyring: Keyring | None = resolve_keyring(keyring, self.root)
        self._movelogs: dict[str, MoveLog] = {}  # per model: the signed move records (kit.registry.movelog)

    @property
    def location(self) -> str:
        """Where this registry lives, as a service or another process names it: its folder (an object-store
        registry overrides this with its ``s3://`` URL; its ``root`` is this host's mirror)."""
        return str(self.root)

    @classmethod
    def from_config(cls, config: KitConfig) -> Self:
        return cls(config.registry, require_gate=config.require_gate, user=config.user, keyring=config.keyring())

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ---- paths and locks
    def model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / "versions" / str(validate_version(version))

    def aliases_path(self, name: str) -> Path:
        return self.model_dir(name) / "aliases.json"

    def events_path(self, name: str) -> Path:
        return self.model_dir(name) / "events.jsonl"

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        import filelock  # only writers lock (80 ms to import): a serving worker never does

        refuse_object_fuse(self.root)
        d = self.model_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(d / ".lock"), timeout=_LOCK_TIMEOUT)
        try:
            with lock:
                yield
        except filelock.Timeout as exc:
            raise KitError(
                f"Timed out after {_LOCK_TIMEOUT:.0f}s waiting for the lock on model {name!r} ({d / '.lock'}). "
                "Another kit process is holding it; retry when it finishes."
            ) from exc

    # ---- reading
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def _version_numbers(self, name: str) -> list[int]:
        vdir = self.model_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if is_version_text(p.name) and (p / "meta.json").is_file())

    def _require_model(self, name: str) -> None:
        if not (self.model_dir(name) / "versions").is_dir():
            have = ", ".join(self.models()) or "none"
            raise ModelNotFoundError(
                f"No model {name!r} in the registry at {self.root} (models: {have}). "
                "Register one with kit.registry.Registry.register() or %deploy."
            )

    def versions(self, name: str) -> list[ModelVersion]:
        self._require_model(name)
        return [self._read_version(name, v) for v in self._version_numbers(name)]

    def _read_version(self, name: str, version: int) -> ModelVersion:
        """A version's meta.json, parsed without any check of its signature or its place: for listing
        (``kit models``) only. What is loaded, gated, promoted or packed is read through
        :meth:`kit.registry.integrity.CheckedStore.verified`, which verifies the same bytes it parses."""
        return self._parse_meta(name, version, self._meta_bytes(name, version))

    def _meta_bytes(self, name: str, version: int) -> bytes:
        """meta.json's bytes, read once (size-capped: anyone who can write the registry can write it)."""
        meta_path = self.version_dir(name, version) / "meta.json"
        try:
            return read_capped(meta_path, MAX_META_BYTES)
        except FileNotFoundError as exc:
            raise VersionNotFoundError(self._no_version_msg(name, version)) from exc
        except (OSError, ValueError) as exc:
            raise RegistryCorruptError(f"{meta_path} is unreadable ({exc}). The version was altered after it was "
                                       f"written; run `kit verify {name}` and re-register the model.") from exc

    def _parse_meta(self, name: str, version: int, data: bytes, *, bound: bool = False) -> ModelVersion:
        """The ModelVersion in meta.json's ``data`` (the caller's one read), at ``name``/versions/``version``.

        ``bound``: refuse (``IntegrityError``) a meta.json whose own ``name`` and ``version`` are not where
        it sits, e.g. a signed version copied under another model name or number (a replay).
        """
        path = self.version_dir(name, version)
        meta_path = path / "meta.json"
        try:
            meta = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryCorruptError(
                f"{meta_path} is not valid JSON ({exc}). The version was altered after it was written; "
                "run `kit verify` and re-register the model."
            ) from exc
        if bound:
            check_place(meta, name, version, meta_path)
        try:
            return ModelVersion(
                name=name, version=version, path=path, created=meta["created"],
                artifact_sha256=meta["artifact_sha256"], files=dict(meta["files"]),
                signature=meta["signature"], env=meta["env"], source=meta.get("source", {}),
                metrics=meta.get("metrics", {}), tags=meta.get("tags", {}), capture=meta.get("capture", {}),
                file_sizes=read_file_sizes(meta.get("file_sizes")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryCorruptError(f"{meta_path} lacks field {exc}. Run `kit verify {name}`.") from exc

    def _no_version_msg(self, name: str, version: int) -> str:
        have = self._version_numbers(name)
        span = f"{have[0]}-{have[-1]}" if have else "none"
        return f"Model {name!r} has no version {version} (have {span}). Run `kit models {name}`."

    def get(self, name: str, ref: int | str | None = None) -> ModelVersion:
        """A version by number, by alias (``production``, ``canary``) or ``latest``, for listing and
        display (its signature is not checked: :meth:`CheckedStore.verified` is what loads use).

        ``ref=None`` means production when set, else the latest version.
        """
        return self._read_version(name, self._resolve_number(name, ref))

    def _resolve_number(self, name: str, ref: int | str | None) -> int:
        """The version number ``ref`` names (see :meth:`get`)."""
        self._require_model(name)
        if ref is None:
            ref = "production" if self.aliases(name).production else "latest"
        if ref == "latest":
            nums = self._version_numbers(name)
            if not nums:
                raise VersionNotFoundError(f"Model {name!r} has no versions yet.")
            return nums[-1]
        if ref in ALIASES:
            a = self.aliases(name)
            v = a.production if ref == "production" else a.canary
            if v is None:
                raise VersionNotFoundError(  # each shell adds its own command for the remedy
                    f"Model {name!r} has no {ref} version. "
                    + ("Start a canary first." if ref == "canary" else "Promote a version first."),
                    remedy="start_canary" if ref == "canary" else "promote", subject=name,
                )
            return v
        version = validate_version(ref)
        if version not in self._version_numbers(name):
            raise VersionNotFoundError(self._no_version_msg(name, version))
        return version

    def resolve(self, ref: str) -> ModelVersion:
        """``"name@ref"`` -> the version."""
        name, sel = parse_ref(ref)
        return self.get(name, sel)

    def movelog(self, name: str) -> MoveLog:
        """``name``'s signed move records as this registry reads and writes them (one per model, so the
        serial it accepted last is remembered: a reader never goes back)."""
        log_ = self._movelogs.get(name)
        if log_ is None:
            log_ = MoveLog(name, MoveStorage(self.model_dir(name)), self._move_trust,
                           functools.partial(self._gate_problem, name))
            self._movelogs[name] = log_
        return log_

    def _move_trust(self) -> Trust | None:
        return self.keyring.trust() if self.keyring is not None else None

    def _gate_problem(self, name: str, version: int, gate: JSONObject, artifact_sha256: str) -> str | None:
        return "this reader cannot check gate results"  # kit.registry.aliases.AliasMoves can

    def aliases(self, name: str) -> Aliases:
        """The verified state of ``name``'s newest move record (``aliases.json`` and any newer record).

        Raises :class:`SignatureError` for a record no trusted key (or delegated guard key, within its
        authority) signed, an unsigned or pre-signing ``aliases.json`` where signatures are checked, or a
        serial older than one this registry object already followed."""
        return self.movelog(name).current()

    def history(self, name: str) -> list[JSONObject]:
        """The audit trail, oldest first: the unsigned events (register, gate, sign) and every move record,
        each marked ``verified`` (and ``problem`` when its signature, authority or chain fails)."""
        self._require_model(name)
        out: list[JSONObject] = []
        path = self.events_path(name)
        if path.exists():
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("skipping unreadable line %d of %s", i, path)
                    continue
                if isinstance(ev, dict):
                    out.append(ev)
        out += self._registers_without_event(name, out)
        for serial, move, problem in self.movelog(name).history():
            out.append(move_event(name, serial, move, problem))
        out.sort(key=lambda e: str(e.get("ts", "")))
        return out

    def _registers_without_event(self, name: str, events: list[JSONObject]) -> list[JSONObject]:
        """A register event, from its meta.json, for each visible version whose writer was killed after the
        version appeared and before its event was appended: the signed meta.json is the record, the event
        log its index, so no version goes missing from the history."""
        logged = {e.get("version") for e in events if e.get("event") == "register"}
        out: list[JSONObject] = []
        for v in self._version_numbers(name):
            if v in logged:
                continue
            try:
                mv = self._read_version(name, v)
            except KitError as exc:
                log.warning("%s@%d: no register event and an unreadable meta.json: %s", name, v, exc)
                continue
            out.append({"ts": mv.created, "event": "register", "name": name, "version": v,
                        "artifact_sha256": mv.artifact_sha256, "user": None,
                        "recovered": "from meta.json: its writer stopped before appending this event"})
        return out

    # ---- writing
    def register(
        self,
        name: str,
        model: CapturedModel | nn.Module,
        example_inputs: object = None,
        *,
        metrics: Mapping[str, object] | None = None,
        tags: Mapping[str, object] | None = None,
        source: Mapping[str, object] | None = None,
        project_root: Path | None = None,
        progress: Progress = None,
        **capture_kwargs: Any,
    ) -> ModelVersion:
        """Register a new immutable version.

        ``model`` is a :class:`kit.capture.CapturedModel`, or an ``nn.Module`` captured here with
        ``example_inputs`` (``capture_kwargs`` go to :func:`kit.capture.capture`).

        ``progress`` says each step (capture's ``torch.export``, ``parity`` and ``onnx`` when capturing here;
        ``save``, ``hash``, ``upload`` for a bucket, ``publish``) as :mod:`kit.progress` describes: a callable
        taking each begin and end line, None (a line per step on stderr as it ends) or False (silent). The
        seconds of every step before ``publish`` are kept in meta.json's ``capture.steps``.
        """
        from kit.capture import CapturedModel, capture

        validate_name(name)
        refuse_object_fuse(self.root)  # before a capture is spent on a registry that cannot take it
        if not isinstance(model, CapturedModel):
            if example_inputs is None:
                raise KitError("register() needs example_inputs to capture an nn.Module (or pass a CapturedModel).")
            model = capture(model, example_inputs, progress=progress, **capture_kwargs)
        steps = Steps.of(progress, f"register {name}")
        model_dir = self.model_dir(name)
        need = check_register_space(model, self.cache.root, self.root, name)  # before any byte: torch aborts on ENOSPC
        with storage_errors(model_dir, f"a new version of {name!r}", need):
            (model_dir / "versions").mkdir(parents=True, exist_ok=True)
            self._clean_stale_tmp(name)
            tmp = model_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        try:
            with self.cache.private_dir() as private, storage_errors(model_dir, f"a new version of {name!r}", need):
                files = _save_synced(model, tmp, private, steps)
            meta = _new_meta(name, model, files, metrics=metrics, tags=tags, source=source,
                             project_root=project_root, steps=steps.seconds)
            meta["file_sizes"] = {f: (tmp / f).stat().st_size for f in files}  # a bucket lists without downloads
            _check_json(meta, "metrics/tags/source")
            signer = self.keyring.signer() if self.keyring is not None and self.keyring.can_sign() else None
            with self.lock(name), storage_errors(model_dir, f"version files of {name!r}"):
                version = self._publish(name, tmp, meta, signer, steps)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registered %s@%d at %s", name, version, self.version_dir(name, version))
        return self._read_version(name, version)

    def _publish(self, name: str, tmp: Path, meta: JSONObject, signer: SigningKey | None, steps: Steps) -> int:
        """Number, write (and sign) meta.json and rename ``tmp`` into place; callers hold the model lock."""
        with steps.step("publish", "number, meta.json, signature, rename"):
            return self._publish_here(name, tmp, meta, signer)

    def _publish_here(self, name: str, tmp: Path, meta: JSONObject, signer: SigningKey | None) -> int:
        nums = self._version_numbers(name)
        version = (nums[-1] + 1) if nums else 1
        meta["version"] = version  # with meta["name"]: every verified read checks it sits at name@version
        data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        atomic_write_bytes(tmp / "meta.json", data)
        if signer is not None:  # meta.json binds every file's sha256: its signature binds the version
            sign_file(tmp / "meta.json", signer, data=data)  # the bytes built here, whatever tmp holds now
        fsync_dir(tmp)
        final = self.version_dir(name, version)
        os.rename(tmp, final)  # atomic: the version appears whole or not at all
        fsync_dir(final.parent)
        self._event(name, "register", version=version, artifact_sha256=meta["artifact_sha256"])
        return version

    def _clean_stale_tmp(self, name: str) -> None:
        """Remove temporary folders left by processes that died mid-register."""
        for p in self.model_dir(name).glob(".tmp-*"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)

    def _event(self, name: str, event: str, **fields: object) -> JSONObject:
        """Append one audit record; callers hold the model lock."""
        rec = {"ts": utcnow(), "event": event, "name": name, "user": fields.pop("user", None) or self.user}
        rec.update(fields)
        append_line(self.events_path(name), json.dumps(rec, sort_keys=True))
        return rec

    def record_event(self, name: str, event: str, **fields: object) -> JSONObject:
        """Append an audit record (e.g. a gate run) under the model lock."""
        with self.lock(name):
            return self._event(name, event, **fields)


def check_place(meta: object, name: str, version: int, meta_path: Path) -> None:
    """``IntegrityError`` unless the (signed) meta.json names the model and version folder it sits in."""
    ref = f"{name}@{version}"
    if not isinstance(meta, dict) or "name" not in meta or "version" not in meta:
        raise IntegrityError(
            f"{meta_path} does not name its model and version, so its signature does not bind it to {ref}. If "
            f"the version is yours, re-sign it where your key is (`kit keys sign {ref}` adds them), else "
            "register the model again.")
    if meta["name"] != name or type(meta["version"]) is not int or meta["version"] != version:
        raise IntegrityError(
            f"{meta_path} was signed for {meta['name']}@{meta['version']} but sits at {ref}: a version copied "
            f"to another place is refused. Load {meta['name']}@{meta['version']} where it was registered, "
            f"or register the model again as {name}.")


def _save_synced(model: CapturedModel, folder: Path, private: Path, steps: Steps) -> dict[str, str]:
    """``model.save`` into ``private`` (a folder only this user can write), then each file copied into the
    registry's ``folder`` while hashed (fsync'd); file name -> sha256 of exactly the bytes written there
    from the private copy. Hashing files in the registry folder itself would let a writer there swap one
    between the save and the hash, and have the key holder sign the writer's bytes."""
    from kit.backends.checks import DEFAULT_MAX_ARTIFACT_BYTES

    with steps.step("save", "the model's files, in a private folder"):
        written = model.save(private)
    with steps.step("hash", "copied into the registry while hashed"):
        return {p.name: copy_hashed(p, folder / p.name, 4 * DEFAULT_MAX_ARTIFACT_BYTES, file_mode())[0]
                for p in written}


def _new_meta(name: str, model: CapturedModel, files: dict[str, str], *, metrics: Mapping[str, object] | None,
              tags: Mapping[str, object] | None, source: Mapping[str, object] | None,
              project_root: Path | None, steps: Mapping[str, float]) -> JSONObject:
    """A new version's meta.json, less its number (taken under the lock). ``capture.steps``: the seconds of
    capture's steps and of register's so far (an object store adds its upload before it writes this)."""
    from kit.env import fingerprint

    return {
        "schema": SCHEMA,
        "name": name,
        "created": utcnow(),
        "files": files,
        "artifact_sha256": artifact_digest(files),
        "signature": model.signature.to_dict(),
        "env": fingerprint(project_root).to_dict(),
        "source": dict(source) if source is not None else detect_source(cwd=project_root),
        "metrics": dict(metrics or {}),
        "tags": dict(tags or {}),
        "capture": {
            "seconds": round(model.seconds, 3),
            "model_class": model.model_class,
            "parity": model.parity.to_dict(),
            "format": "torch.export",
            "onnx": _onnx_record(model),
            "steps": {**getattr(model, "steps", {}), **steps},
        },
    }


def _onnx_record(model: CapturedModel) -> JSONObject:
    """meta.json's ``capture.onnx``: kit.backends.onnx.export's record, or why there is none."""
    onnx = getattr(model, "onnx", None)
    if onnx is None:
        return {"exported": False, "reason": "this CapturedModel carries no ONNX export; capture it again with "
                                             "kit.capture.capture() to serve with onnxruntime"}
    return dict(onnx.record)


def _check_json(obj: object, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise KitError(f"{what} must be JSON-serialisable: {exc}") from exc
