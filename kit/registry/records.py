"""The registry's records: a version's metadata (and the digest that names its artifact), the aliases
file and a verification result.

Frozen dataclasses read from and written as JSON (``meta.json``, ``aliases.json``); never pickled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kit._types import JSONObject
from kit.errors import InvalidNameError, RegistryCorruptError
from kit.registry.names import check_weight, validate_version

SCHEMA = 1


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    created: str
    artifact_sha256: str
    files: dict[str, str]
    signature: JSONObject
    env: JSONObject
    source: JSONObject = field(default_factory=dict)
    metrics: JSONObject = field(default_factory=dict)
    tags: JSONObject = field(default_factory=dict)
    capture: JSONObject = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)  # meta.json's, where its register recorded them

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this version can be served with: those whose artifact it holds."""
        from kit.backends import BACKENDS

        return tuple(b.name for b in BACKENDS.values() if b.artifact in self.files)

    def missing_backends(self) -> dict[str, str]:
        """Backend -> why this version cannot be served with it (capture's record, e.g. the ONNX reason)."""
        from kit.backends import BACKENDS

        reason = str(self.capture.get("onnx", {}).get("reason") or "not exported at capture")
        return {b.name: reason if b.export else "no artifact" for b in BACKENDS.values()
                if b.name not in self.backends}

    def __repr__(self) -> str:  # the fields hold the whole environment: a notebook shows this instead
        onnx = "onnx" if self.capture.get("onnx", {}).get("exported") else "no onnx"
        return (f"<ModelVersion {self.ref} sha256 {self.short_sha} created {self.created} "
                f"{len(self.files)} files ({onnx}) at {self.path}>")

    @property
    def short_sha(self) -> str:
        return self.artifact_sha256[:12]

    @property
    def size_bytes(self) -> int:
        """The version's bytes: as its record says (meta.json's ``file_sizes``, what a bucket's listing shows
        for versions this host never downloaded), else what the files here hold (versions registered before
        sizes were recorded)."""
        if self.files and set(self.files) <= set(self.file_sizes):
            return sum(self.file_sizes[f] for f in self.files)
        return sum((self.path / f).stat().st_size for f in self.files if (self.path / f).exists())

    def to_dict(self) -> JSONObject:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def read_file_sizes(value: object) -> dict[str, int]:
    """meta.json's ``file_sizes`` (file name -> bytes); {} where it is absent or not such a mapping (a display
    value: what a load trusts is each file's sha256)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if type(v) is int and v >= 0}


@dataclass(frozen=True)
class Aliases:
    """What a model serves: the state of its newest signed move record (:mod:`kit.registry.moves`).

    ``guards`` are the guard keys the running canary's record delegated (key id -> public key, plan);
    ``signed_by`` the key whose signature of that record verified (None unsigned or unchecked);
    ``action`` the move that made this state; ``artifacts`` the artifact sha256 of each version named.
    """

    production: int | None = None
    canary: int | None = None
    canary_weight: float = 0.0
    previous: tuple[int, ...] = ()
    serial: int = 0
    updated: str | None = None
    guards: JSONObject = field(default_factory=dict, compare=False)
    signed_by: str | None = field(default=None, compare=False)
    action: str | None = field(default=None, compare=False)
    artifacts: dict[str, str] = field(default_factory=dict, compare=False)

    def to_json(self) -> JSONObject:
        d: JSONObject = {"schema": SCHEMA, "serial": self.serial, "updated": self.updated}
        if self.production is not None:
            d["production"] = {"version": self.production, "previous": list(self.previous)}
        if self.canary is not None:
            d["canary"] = {"version": self.canary, "weight": self.canary_weight}
        return d

    def state(self) -> JSONObject:
        """The ``state`` of a move record: what a signature binds."""
        canary = None if self.canary is None else {"version": self.canary, "weight": self.canary_weight,
                                                   "guards": dict(self.guards)}
        return {"production": self.production, "previous": list(self.previous), "canary": canary}

    @classmethod
    def from_state(cls, state: Mapping[str, object], serial: int, updated: str | None, where: str, *,
                   signed_by: str | None = None, action: str | None = None,
                   artifacts: Mapping[str, str] | None = None) -> Aliases:
        can = state.get("canary")
        prod = state.get("production")
        d = {"serial": serial, "updated": updated,
             "production": {"version": prod, "previous": state.get("previous", [])} if prod is not None else None,
             "canary": {"version": can.get("version"), "weight": can.get("weight", 0.0)} if isinstance(can, dict) else None}
        a = cls.from_json(d, where)
        guards = can.get("guards", {}) if isinstance(can, dict) else {}
        return dataclasses.replace(a, guards=dict(guards) if isinstance(guards, dict) else {}, signed_by=signed_by,
                                   action=action, artifacts=dict(artifacts or {}))

    @classmethod
    def from_json(cls, d: object, where: str) -> Aliases:
        def bad(why: str) -> RegistryCorruptError:
            return RegistryCorruptError(
                f"{where} is malformed ({why}). Rebuild it from the signed move records with "
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
            weight = check_weight(can.get("weight", 0.0), allow_zero=True) if can else 0.0
            serial = int(d.get("serial", 0))
        except (KeyError, TypeError, ValueError, InvalidNameError) as exc:
            raise bad(str(exc)) from exc
        return cls(production, canary, weight, previous, serial, d.get("updated"))


@dataclass(frozen=True)
class VerifyResult:
    ref: str
    ok: bool
    problems: tuple[str, ...] = ()
    signed_by: str | None = None  # the trusted key whose signature of meta.json verified


def artifact_digest(files: Mapping[str, str]) -> str:
    """One sha256 over every file's name and sha256: what a gate result is bound to."""
    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(f"{fname}\0{files[fname]}\n".encode())
    return h.hexdigest()
