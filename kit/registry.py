"""The model registry: immutable numbered versions, aliases, and an append-only audit log.

Layout (one folder per model name)::

    <root>/<name>/versions/<n>/      model.pt2, example.npz, meta.json, gates/<run-id>/...
    <root>/<name>/aliases.json       {"production": {"version": 3, "previous": [1, 2]},
                                      "canary": {"version": 4, "weight": 0.1}, "serial": 7, ...}
    <root>/<name>/events.jsonl       register, gate, promote, canary, rollback (who, when, why)
    <root>/<name>/.lock              cross-process lock for numbering, aliases and events

A version is built in a hidden temporary folder and renamed into place when whole, so a crash at any
point leaves either no version or a whole one. ``aliases.json`` is replaced atomically and is the one
source of truth for what is served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from kit.signing import Keyring, sig_path, sign_file, verify_bytes, verify_file

from kit._io import append_line, atomic_write_json, fsync_dir, sha256_file
from kit.errors import (
    IntegrityError,
    SignatureError,
    InvalidNameError,
    KitError,
    ModelNotFoundError,
    PromotionRefusedError,
    RegistryCorruptError,
    VersionNotFoundError,
)
from kit.gate import evidence as gate_evidence

log = logging.getLogger(__name__)

SCHEMA = 1
ALIASES = ("production", "canary")
REFS = ("production", "canary", "latest")
# Matched with fullmatch (``$`` would accept a trailing newline); ASCII classes only.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,9}")  # ASCII digits: str.isdigit() takes "²" and "١"
_LOCK_TIMEOUT = 60.0


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate_name(name: str, what: str = "model name") -> str:
    """A model (or service: ``what``) name: ASCII letters, digits, '.', '_', '-'; no separators, no '..'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"Invalid {what} {name!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', no '..', no spaces or control characters)."
        )
    return name


def is_version_text(text: str) -> bool:
    """True for 1-9 ASCII digits (what a version number may be written as in a ref, path or header)."""
    return isinstance(text, str) and _VERSION_RE.fullmatch(text) is not None


def validate_version(version: Any) -> int:
    if isinstance(version, bool):
        raise InvalidNameError(f"Invalid version {version!r}: versions are positive integers.")
    if isinstance(version, int):
        v = version
    elif isinstance(version, str) and is_version_text(version):
        v = int(version)
    else:
        raise InvalidNameError(f"Invalid version {version!r}: versions are positive integers (1, 2, ...).")
    if v < 1:
        raise InvalidNameError(f"Invalid version {version!r}: versions start at 1.")
    return v


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"digits@3"`` -> ("digits", "3"); ``"digits@production"``; ``"digits"`` -> ("digits", None)."""
    name, _, sel = ref.partition("@")
    validate_name(name)
    if sel == "":
        return name, None
    if sel not in REFS:
        validate_version(sel)
    return name, sel


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    created: str
    artifact_sha256: str
    files: dict[str, str]
    signature: dict[str, Any]
    env: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def short_sha(self) -> str:
        return self.artifact_sha256[:12]

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files if (self.path / f).exists())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class Aliases:
    production: int | None = None
    canary: int | None = None
    canary_weight: float = 0.0
    previous: tuple[int, ...] = ()
    serial: int = 0
    updated: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA, "serial": self.serial, "updated": self.updated}
        if self.production is not None:
            d["production"] = {"version": self.production, "previous": list(self.previous)}
        if self.canary is not None:
            d["canary"] = {"version": self.canary, "weight": self.canary_weight}
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Aliases":
        def bad(why: str) -> RegistryCorruptError:
            return RegistryCorruptError(
                f"{where} is malformed ({why}). Rebuild it from the audit log with "
                f"`kit aliases repair {Path(where).parent.name}`."
            )

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        try:
            prod = d.get("production")
            can = d.get("canary")
            production = validate_version(prod["version"]) if prod else None
            previous = tuple(validate_version(v) for v in (prod or {}).get("previous", []))
            canary = validate_version(can["version"]) if can else None
            weight = float(can.get("weight", 0.0)) if can else 0.0
            serial = int(d.get("serial", 0))
        except (KeyError, TypeError, ValueError, InvalidNameError) as exc:
            raise bad(str(exc)) from exc
        if not 0.0 <= weight <= 1.0:
            raise bad(f"canary weight {weight} is outside [0, 1]")
        return cls(production, canary, weight, previous, serial, d.get("updated"))


@dataclass(frozen=True)
class VerifyResult:
    ref: str
    ok: bool
    problems: tuple[str, ...] = ()
    signed_by: str | None = None  # the trusted key whose signature of meta.json verified


# --------------------------------------------------------------------------- lineage


def detect_source(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Where the model came from: the notebook (Jupyter sets JPY_SESSION_NAME) or script, and git."""
    environ = os.environ if environ is None else environ
    cwd = Path(cwd or os.getcwd())
    src: dict[str, Any] = {}
    if environ.get("JPY_SESSION_NAME"):
        src.update(kind="notebook", path=environ["JPY_SESSION_NAME"])
    elif environ.get("PAPERMILL_INPUT_PATH"):
        src.update(kind="notebook", path=environ["PAPERMILL_INPUT_PATH"])
    elif "ipykernel" in sys.modules:
        src.update(kind="notebook", path=None)
    else:
        src.update(kind="script", path=os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            src["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd, capture_output=True, text=True, timeout=5,
            )
            src["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return src


# --------------------------------------------------------------------------- registry


class Registry:
    """A registry rooted at a folder. Safe to use from many processes at once."""

    def __init__(self, root: Path | str, *, require_gate: bool = True, user: str | None = None,
                 keyring: Keyring | None = None):
        """``keyring`` signs what this registry writes (meta.json, gate results) and is the trust every
        read checks signatures against. None: nothing is signed or signature-checked (sha256 only)."""
        self.root = Path(root).resolve()
        self.require_gate = require_gate
        self.user = user or "unknown"
        self.keyring = keyring

    @classmethod
    def from_config(cls, config: Any) -> "Registry":
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
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name))

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
        path = self.version_dir(name, version)
        meta_path = path / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError as exc:
            raise VersionNotFoundError(self._no_version_msg(name, version)) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryCorruptError(
                f"{meta_path} is not valid JSON ({exc}). The version was altered after it was written; "
                "run `kit verify` and re-register the model."
            ) from exc
        try:
            return ModelVersion(
                name=name, version=version, path=path, created=meta["created"],
                artifact_sha256=meta["artifact_sha256"], files=dict(meta["files"]),
                signature=meta["signature"], env=meta["env"], source=meta.get("source", {}),
                metrics=meta.get("metrics", {}), tags=meta.get("tags", {}), capture=meta.get("capture", {}),
            )
        except (KeyError, TypeError) as exc:
            raise RegistryCorruptError(f"{meta_path} lacks field {exc}. Run `kit verify {name}`.") from exc

    def _no_version_msg(self, name: str, version: int) -> str:
        have = self._version_numbers(name)
        span = f"{have[0]}-{have[-1]}" if have else "none"
        return f"Model {name!r} has no version {version} (have {span}). Run `kit models {name}`."

    def get(self, name: str, ref: int | str | None = None) -> ModelVersion:
        """A version by number, by alias (``production``, ``canary``) or ``latest``.

        ``ref=None`` means production when set, else the latest version.
        """
        self._require_model(name)
        if ref is None:
            ref = "production" if self.aliases(name).production else "latest"
        if ref == "latest":
            nums = self._version_numbers(name)
            if not nums:
                raise VersionNotFoundError(f"Model {name!r} has no versions yet.")
            return self._read_version(name, nums[-1])
        if ref in ALIASES:
            a = self.aliases(name)
            v = a.production if ref == "production" else a.canary
            if v is None:
                raise VersionNotFoundError(  # each shell adds its own command for the remedy
                    f"Model {name!r} has no {ref} version. "
                    + ("Start a canary first." if ref == "canary" else "Promote a version first."),
                    remedy="start_canary" if ref == "canary" else "promote", subject=name,
                )
            return self._read_version(name, v)
        version = validate_version(ref)
        if version not in self._version_numbers(name):
            raise VersionNotFoundError(self._no_version_msg(name, version))
        return self._read_version(name, version)

    def resolve(self, ref: str) -> ModelVersion:
        """``"name@ref"`` -> the version."""
        name, sel = parse_ref(ref)
        return self.get(name, sel)

    def aliases(self, name: str) -> Aliases:
        path = self.aliases_path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return Aliases()
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryCorruptError(
                f"{path} is not valid JSON ({exc}; {len(text)} bytes, truncated or overwritten?). "
                f"Rebuild it from the audit log with `kit aliases repair {name}`."
            ) from exc
        return Aliases.from_json(data, str(path))

    def history(self, name: str) -> list[dict[str, Any]]:
        self._require_model(name)
        out: list[dict[str, Any]] = []
        path = self.events_path(name)
        if not path.exists():
            return out
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping unreadable line %d of %s", i, path)
        return out

    # ---- writing
    def register(
        self,
        name: str,
        model: Any,
        example_inputs: Any = None,
        *,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        project_root: Path | None = None,
        **capture_kwargs: Any,
    ) -> ModelVersion:
        """Register a new immutable version.

        ``model`` is a :class:`kit.capture.CapturedModel`, or an ``nn.Module`` captured here with
        ``example_inputs`` (``capture_kwargs`` go to :func:`kit.capture.capture`).
        """
        from kit.capture import CapturedModel, capture
        from kit.env import fingerprint

        validate_name(name)
        if not isinstance(model, CapturedModel):
            if example_inputs is None:
                raise KitError("register() needs example_inputs to capture an nn.Module (or pass a CapturedModel).")
            model = capture(model, example_inputs, **capture_kwargs)
        model_dir = self.model_dir(name)
        (model_dir / "versions").mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp(name)
        tmp = model_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            written = model.save(tmp)
            files = {p.name: sha256_file(p) for p in written}
            for p in written:
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            meta: dict[str, Any] = {
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
                },
            }
            _check_json(meta, "metrics/tags/source")
            signer = self.keyring.signer() if self.keyring is not None and self.keyring.can_sign() else None
            with self.lock(name):
                nums = self._version_numbers(name)
                version = (nums[-1] + 1) if nums else 1
                meta["version"] = version
                atomic_write_json(tmp / "meta.json", meta)
                if signer is not None:  # meta.json binds every file's sha256: its signature binds the version
                    sign_file(tmp / "meta.json", signer)
                fsync_dir(tmp)
                final = self.version_dir(name, version)
                os.rename(tmp, final)  # atomic: the version appears whole or not at all
                fsync_dir(final.parent)
                self._event(name, "register", version=version, artifact_sha256=meta["artifact_sha256"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registered %s@%d at %s", name, version, final)
        return self._read_version(name, version)

    def _clean_stale_tmp(self, name: str) -> None:
        """Remove temporary folders left by processes that died mid-register."""
        for p in self.model_dir(name).glob(".tmp-*"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)

    def _event(self, name: str, event: str, **fields: Any) -> dict[str, Any]:
        """Append one audit record; callers hold the model lock."""
        rec = {"ts": utcnow(), "event": event, "name": name, "user": fields.pop("user", None) or self.user}
        rec.update(fields)
        append_line(self.events_path(name), json.dumps(rec, sort_keys=True))
        return rec

    def record_event(self, name: str, event: str, **fields: Any) -> dict[str, Any]:
        """Append an audit record (e.g. a gate run) under the model lock."""
        with self.lock(name):
            return self._event(name, event, **fields)

    # ---- verification and loading
    def verify(self, name: str | None = None, version: int | None = None) -> list[VerifyResult]:
        """Re-hash every file of the selected versions against meta.json."""
        names = [name] if name else self.models()
        results = []
        for n in names:
            nums = [validate_version(version)] if version is not None else self._version_numbers(n)
            for v in nums:
                results.append(self._verify_one(n, v))
        return results

    def _verify_one(self, name: str, version: int) -> VerifyResult:
        ref = f"{name}@{version}"
        try:
            mv = self._read_version(name, version)
        except KitError as exc:
            return VerifyResult(ref, False, (str(exc),))
        problems = []
        signed_by = None
        try:
            signed_by = self.check_signature(mv)
        except SignatureError as exc:
            problems.append(str(exc))
        problems += _file_problems(mv)
        return VerifyResult(ref, not problems, tuple(problems), signed_by)

    def trust(self) -> Any:
        """The :class:`kit.signing.Trust` reads check against; None when this registry checks no signatures."""
        return self.keyring.trust() if self.keyring is not None else None

    def check_signature(self, mv: ModelVersion) -> str | None:
        """The key id whose signature of ``meta.json`` verifies; None when this registry has no keyring.

        Raises :class:`SignatureError` (naming the key and the fix) for an unsigned version, a key not
        trusted here, or a ``meta.json`` changed after it was signed.
        """
        trust = self.trust()
        if trust is None:
            return None
        fix = (f"Do not serve it: restore {mv.ref} from a copy you trust or register the model again. If "
               f"you hold the key and its files are yours, re-sign it with `kit keys sign {mv.ref}`; if "
               "another trusted key signed it, add that key's public key to the trusted keys (service.toml "
               "[trust] public_keys, kit.toml trusted_keys).")
        return verify_file(mv.path / "meta.json", trust, f"{mv.ref} (its meta.json)", fix)

    def check_integrity(self, mv: ModelVersion) -> str | None:
        """Signature of meta.json, then every file's sha256; returns the verified key id (or None)."""
        signed_by = self.check_signature(mv)
        problems = _file_problems(mv)
        if problems:
            raise IntegrityError(
                f"{mv.ref} failed verification: {'; '.join(problems)}. The files were changed after "
                "registration; restore them or register the model again."
            )
        return signed_by

    def sign_version(self, name: str, version: int) -> str:
        """Sign an existing version's meta.json (after checking every file's sha256); returns the key id.

        For versions registered before signing (or without a key). Sign only versions you know are yours.
        """
        if self.keyring is None or not self.keyring.can_sign():
            raise SignatureError(f"This registry has no signing key; sign {name}@{version} where your key is "
                                 "(`kit keys list`).")
        mv = self.get(name, version)
        problems = _file_problems(mv)
        if problems:
            raise IntegrityError(f"Refusing to sign {mv.ref}: {'; '.join(problems)}.")
        key = self.keyring.signer()
        with self.lock(name):
            sign_file(mv.path / "meta.json", key)
            self._event(name, "sign", version=mv.version, key_id=key.key_id,
                        artifact_sha256=mv.artifact_sha256)
        return key.key_id

    def load(self, name: str, ref: int | str | None = None, *, check_env: bool = True,
             max_artifact_bytes: int | None = None) -> "LoadedModel":
        """Load a version for inference, after verifying every file's sha256 (and the environment).

        ``max_artifact_bytes`` bounds what opening the artifact may cost (default: kit.artifacts' 8 GiB).
        """
        from kit.artifacts import limits_for
        from kit.capture import EXAMPLE_FILE, MODEL_FILE, Signature, load_examples, load_program
        from kit.env import Fingerprint, diff, fingerprint

        mv = self.get(name, ref)
        signed_by = self.check_signature(mv)  # SignatureError first: it names the key and the fix
        problems = _file_problems(mv)
        if problems:
            raise IntegrityError(
                f"Refusing to load {mv.ref}: {'; '.join(problems)}. The files were changed after "
                f"registration; restore them or register the model again."
            )
        drift = None
        if check_env:
            drift = diff(Fingerprint.from_dict(mv.env), fingerprint())
            drift.raise_for_errors(f"This environment (for {mv.ref})")
        limits = limits_for(max_artifact_bytes)
        module = load_program(mv.path / MODEL_FILE, limits)  # kit.artifacts checks it first: no pickle, no code
        name_dims = getattr(module, "name_dims", None)  # kit.capture.ExportedForward: dim names in its errors
        if callable(name_dims):
            name_dims(Signature.from_dict(mv.signature))
        ins, outs = load_examples(mv.path / EXAMPLE_FILE, limits)
        return LoadedModel(mv, module, Signature.from_dict(mv.signature), ins, outs, drift, signed_by)

    # ---- gates (evidence stored beside the version; its format is kit.gate.evidence's)
    def gate_root(self, name: str, version: int) -> Path:
        return gate_evidence.gates_dir(self.version_dir(name, version))

    def gate_results(self, name: str, version: int) -> list[dict[str, Any]]:
        return gate_evidence.read_results(self.version_dir(name, version))

    def passing_gate(self, mv: ModelVersion) -> dict[str, Any] | None:
        """The newest passing gate result recorded for exactly this artifact, if any. With a keyring, only
        results whose ``result.json.sig`` verifies against its trust count: a forged result is no gate."""
        results = self.gate_results(mv.name, mv.version) if self.keyring is None else self._signed_gate_results(mv)
        return gate_evidence.passing_result(results, mv.artifact_sha256)

    def _signed_gate_results(self, mv: ModelVersion) -> list[dict[str, Any]]:
        trust = self.trust()
        out: list[dict[str, Any]] = []
        for p in sorted(gate_evidence.gates_dir(mv.path).glob(f"*/{gate_evidence.RESULT_FILE}")):
            try:
                data = p.read_bytes()  # verify and parse the same bytes
                verify_bytes(data, sig_path(p), trust, f"gate result {p.parent.name} of {mv.ref}",
                             f"Run the gate again where a trusted key is: `kit validate {mv.ref}`.")
                d = json.loads(data)
            except SignatureError as exc:
                log.warning("not counted as a gate: %s", exc)
                continue
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                out.append(d)
        return out

    def sign_evidence(self, path: Path) -> str | None:
        """Sign a file this registry wrote (a gate's result.json) with its key; the key id, or None unkeyed."""
        if self.keyring is None or not self.keyring.can_sign():
            return None
        key = self.keyring.signer()
        sign_file(path, key)
        return key.key_id

    def gate_verdict(self, mv: ModelVersion) -> tuple[str, dict[str, Any] | None]:
        """("passed" | "failed" | "stale" | "-", the deciding gate result) for this version.

        "stale": the newest result was recorded for another artifact sha256.
        """
        verdict, deciding = gate_evidence.verdict(self.gate_results(mv.name, mv.version), mv.artifact_sha256)
        if verdict == "passed" and self.keyring is not None and self.passing_gate(mv) is None:
            return "unsigned", deciding  # a passing result.json no trusted key signed is no gate
        return verdict, deciding

    # ---- alias moves
    def _check_gate(self, mv: ModelVersion, force: bool, why: str | None, action: str) -> dict[str, Any] | None:
        if force:
            if not why or not why.strip():
                raise PromotionRefusedError(
                    f"A forced {action} of {mv.ref} needs a reason (why=...); it is recorded in the audit log.",
                    remedy="why",
                )
            return None
        gate = self.passing_gate(mv)
        if self.require_gate and gate is None:
            raise PromotionRefusedError(
                f"Refusing to {action} {mv.ref}: no passing gate recorded for its artifact sha256 "
                f"{mv.short_sha}. Validate it first, or force it with a reason (audited as forced).",
                remedy="validate", subject=mv.ref,
            )
        return gate

    def _check_integrity_for(self, mv: ModelVersion, action: str) -> None:
        try:
            self.check_integrity(mv)
        except SignatureError as exc:
            raise SignatureError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}", key_id=exc.key_id) from exc
        except IntegrityError as exc:
            raise IntegrityError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}") from exc

    def _write_aliases(self, name: str, new: Aliases) -> Aliases:
        new = dataclasses.replace(new, serial=new.serial + 1, updated=utcnow())
        atomic_write_json(self.aliases_path(name), new.to_json())
        return new

    def promote(self, name: str, version: int | str, *, force: bool = False, why: str | None = None,
                user: str | None = None, expect_serial: int | None = None) -> Aliases:
        """Move ``production`` to ``version``. Needs a passing gate for this artifact unless forced.

        Promoting the current canary ends the canary. ``expect_serial``: refuse if the aliases moved since
        (the canary guard promotes what it judged, once).
        """
        mv = self.get(name, version)
        self._check_integrity_for(mv, "promote")  # --force overrides the gate, never integrity
        with self.lock(name):
            gate = self._check_gate(mv, force, why, "promote")
            cur = self.aliases(name)
            if expect_serial is not None and cur.serial != expect_serial:
                raise PromotionRefusedError(f"{name}'s aliases moved (serial {cur.serial}, expected {expect_serial}); "
                                            "nothing was promoted.", remedy="refresh", subject=name)
            previous = cur.previous
            if cur.production is not None and cur.production != mv.version:
                previous = (*cur.previous, cur.production)[-20:]
            canary, weight = (cur.canary, cur.canary_weight) if cur.canary != mv.version else (None, 0.0)
            new = self._write_aliases(name, dataclasses.replace(
                cur, production=mv.version, previous=previous, canary=canary, canary_weight=weight))
            self._event(name, "promote", version=mv.version, from_version=cur.production, forced=force,
                        why=why, user=user, gate=(gate or {}).get("run_id"), aliases=new.to_json())
        log.info("%s production -> %d", name, mv.version)
        return new

    def set_canary(self, name: str, version: int | str, weight: float, *, force: bool = False,
                   why: str | None = None, user: str | None = None) -> Aliases:
        """Start, re-weight or replace the canary: ``weight`` of traffic (0 < weight <= 1) goes to ``version``.

        Faces call :func:`kit.traffic.set_traffic`, which states the rule and plans the move first.
        """
        weight = _check_weight(weight)
        mv = self.get(name, version)
        if self.aliases(name).canary != mv.version:  # re-weighting a running canary re-hashes nothing
            self._check_integrity_for(mv, "start a canary of")
        with self.lock(name):
            cur = self.aliases(name)
            if cur.production is None:
                raise PromotionRefusedError(
                    f"Model {name!r} has no production version to split traffic with. Promote one first."
                )
            if mv.version == cur.production:
                raise PromotionRefusedError(f"{mv.ref} is already production; a canary must be another version.")
            gate = None
            if not (cur.canary == mv.version):  # re-weighting a running canary needs no new gate
                gate = self._check_gate(mv, force, why, "start a canary of")
            new = self._write_aliases(name, dataclasses.replace(cur, canary=mv.version, canary_weight=weight))
            replaced = cur.canary if cur.canary not in (None, mv.version) else None  # kit.traffic's rule
            self._event(name, "canary", version=mv.version, weight=weight, forced=force, why=why, user=user,
                        gate=(gate or {}).get("run_id"), replaced=replaced, aliases=new.to_json())
        return new

    def set_canary_weight(self, name: str, weight: float, *, why: str | None = None,
                          user: str | None = None) -> Aliases:
        weight = _check_weight(weight)
        cur = self.aliases(name)
        if cur.canary is None:
            raise PromotionRefusedError(f"Model {name!r} has no canary to re-weight. Name the version to start one with.",
                                        remedy="start_canary", subject=name)
        return self.set_canary(name, cur.canary, weight, why=why, user=user)

    def end_canary(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Send all traffic back to production."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if cur.canary is None:
                return cur
            new = self._write_aliases(name, dataclasses.replace(cur, canary=None, canary_weight=0.0))
            self._event(name, "canary_end", version=cur.canary, why=why, user=user, aliases=new.to_json())
        return new

    def end_judged_canary(self, name: str, version: int, serial: int, evidence: dict[str, Any], *,
                          why: str | None = None, user: str | None = None) -> Aliases | None:
        """End canary ``version`` only if the aliases are still at ``serial`` (what the canary guard judged:
        any move since makes its evidence stale), audited as ``canary_guard`` with ``evidence``.
        None when nothing was done."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if (cur.canary, cur.serial) != (version, serial):
                return None
            new = self._write_aliases(name, dataclasses.replace(cur, canary=None, canary_weight=0.0))
            self._event(name, "canary_guard", version=version, why=why, user=user, evidence=evidence,
                        aliases=new.to_json())
        return new

    def step_canary(self, name: str, version: int, serial: int, weight: float, evidence: dict[str, Any], *,
                    why: str | None = None, user: str | None = None) -> Aliases | None:
        """Re-weight canary ``version`` to ``weight`` only if the aliases are still at ``serial`` (the canary
        guard's progressive step), audited as ``canary_step`` with ``evidence``. None when nothing was done."""
        weight = _check_weight(weight)
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if (cur.canary, cur.serial) != (version, serial):
                return None
            new = self._write_aliases(name, dataclasses.replace(cur, canary_weight=weight))
            self._event(name, "canary_step", version=version, weight=weight, why=why, user=user, evidence=evidence,
                        aliases=new.to_json())
        return new

    def rollback(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Production back to the previous production version; any canary is ended."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if not cur.previous:
                raise PromotionRefusedError(
                    f"Model {name!r} has no previous production version to roll back to "
                    f"(production is {cur.production}). Promote a specific version instead."
                )
            target = cur.previous[-1]
            new = self._write_aliases(name, dataclasses.replace(
                cur, production=target, previous=cur.previous[:-1], canary=None, canary_weight=0.0))
            self._event(name, "rollback", version=target, from_version=cur.production, why=why, user=user,
                        ended_canary=cur.canary, aliases=new.to_json())
        log.info("%s rolled back %s -> %d", name, cur.production, target)
        return new

    def repair_aliases(self, name: str, *, user: str | None = None) -> Aliases:
        """Rebuild aliases.json from the newest alias snapshot in the audit log."""
        self._require_model(name)
        with self.lock(name):
            snap = None
            for ev in self.history(name):
                if "aliases" in ev:
                    snap = ev["aliases"]
            new = Aliases.from_json(snap, "audit log") if snap else Aliases()
            atomic_write_json(self.aliases_path(name), new.to_json())
            self._event(name, "aliases_repair", user=user, aliases=new.to_json())
        return new


@dataclass
class LoadedModel:
    """A verified version ready for inference."""

    version: ModelVersion
    module: Any
    signature: Any
    example_inputs: tuple[Any, ...]
    reference_outputs: tuple[Any, ...]
    drift: Any = None
    signed_by: str | None = None  # the trusted key whose signature of meta.json verified at load

    def _mismatch_cause(self) -> str:
        if self.signed_by:
            return (f"Its files are the ones key {self.signed_by} signed (signature and sha256 verified at load), so "
                    "they were not tampered with: this environment computes differently (another torch build, "
                    "library or device). Re-validate the version here")
        return ("Its files match meta.json's sha256 but no signature was checked (no trusted keys here), so "
                "either someone who can write the registry replaced the weights and re-hashed meta.json, or "
                "this environment computes differently. Verify it against a trusted key (`kit verify`, with "
                "`kit keys`) before trusting it; if it verifies, re-validate the version here")

    def __call__(self, *inputs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(*inputs)

    def check_reference(self, atol: float | None = None, rtol: float | None = None) -> float:
        """Run the stored example; raise IntegrityError when it no longer gives the reference output."""
        import torch

        parity = self.version.capture.get("parity", {})
        atol = parity.get("atol", 1e-5) if atol is None else atol
        rtol = parity.get("rtol", 1e-4) if rtol is None else rtol
        out = self(*self.example_inputs)
        from kit.signature import flatten_outputs

        outs = flatten_outputs(out, [s.name for s in self.signature.outputs])
        worst = 0.0
        for got, ref in zip(outs, self.reference_outputs):
            got = got.detach().cpu()
            if got.shape != ref.shape or not torch.allclose(got.double(), ref.double(), atol=atol, rtol=rtol):
                d = float((got.double() - ref.double()).abs().max()) if got.shape == ref.shape else float("inf")
                raise IntegrityError(
                    f"{self.version.ref} no longer reproduces its reference output (max |diff| {d:.3g}, "
                    f"atol {atol:g}). {self._mismatch_cause()}."
                )
            if got.numel():
                worst = max(worst, float((got.double() - ref.double()).abs().max()))
        return worst


def _file_problems(mv: ModelVersion) -> list[str]:
    """Every file's sha256 against meta.json (accidents; the signature of meta.json covers attackers)."""
    problems = []
    for fname, expected in sorted(mv.files.items()):
        if "/" in fname or fname.startswith("."):
            problems.append(f"{fname}: unsafe file name in meta.json")
            continue
        p = mv.path / fname
        if not p.is_file():
            problems.append(f"{fname}: missing")
        elif (got := sha256_file(p)) != expected:
            problems.append(f"{fname}: sha256 {got[:12]}… != recorded {expected[:12]}…")
    if artifact_digest(mv.files) != mv.artifact_sha256:
        problems.append("meta.json: artifact_sha256 does not match the file hashes")
    return problems


def artifact_digest(files: Mapping[str, str]) -> str:
    """One sha256 over every file's name and sha256: what a gate result is bound to."""
    import hashlib

    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(f"{fname}\0{files[fname]}\n".encode())
    return h.hexdigest()


def parse_weight(text: str | float) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. A bare number above 1 is refused (write ``10%``)."""
    s = str(text).strip()
    try:
        w = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError as exc:
        raise InvalidNameError(f"Canary weight {text!r} is not a number; write it as 10% or 0.1.") from exc
    if not s.endswith("%") and w > 1.0:
        raise InvalidNameError(f"Canary weight {text!r} is above 1; write a percentage as {s}% or a fraction as 0.1.")
    if not 0.0 <= w <= 1.0:
        raise InvalidNameError(f"Canary weight {text!r} must be between 0% and 100%.")
    return w


def _check_weight(weight: Any) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError) as exc:
        raise InvalidNameError(f"Canary weight must be a number in (0, 1], got {weight!r}.") from exc
    if not 0.0 < w <= 1.0:
        raise InvalidNameError(f"Canary weight must be in (0, 1] (e.g. 0.1 for 10%), got {weight!r}.")
    return w


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise KitError(f"{what} must be JSON-serialisable: {exc}") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
