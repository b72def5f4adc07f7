"""Environment fingerprint and drift reports.

A fingerprint says what a model was captured, validated or packed in: Python, torch (+CUDA build),
platform, conda prefix/name, a hash of every installed distribution, and hashes of environment.yml and
the lock. :func:`diff` says what changed between two and how badly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

from kit._io import atomic_write_json, sha256_file
from kit.backends import BACKENDS
from kit.backends import get as get_backend
from kit.errors import EnvDriftError

SCHEMA = 1
LOCK_RELPATH = ".kit/environment.lock.json"

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Fingerprint:
    python: str
    implementation: str
    torch: str | None
    cuda: str | None
    platform: str  # e.g. linux-x86_64
    libc: str
    conda_prefix: str | None
    conda_name: str | None
    prefix: str
    distributions_sha256: str
    distributions: dict[str, str] = field(default_factory=dict)
    environment_yml_sha256: str | None = None
    lock_sha256: str | None = None
    schema: int = SCHEMA
    onnxruntime: str | None = None  # onnxruntime (or onnxruntime-gpu) version; None: not installed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> str:
        torch_s = f"torch {self.torch}" + (f" (CUDA {self.cuda})" if self.cuda else " (CPU)")
        where = f"conda env {self.conda_name}" if self.conda_name else f"prefix {self.prefix}"
        return f"Python {self.python}, {torch_s}, {self.platform}, {where}, {len(self.distributions)} packages"


@dataclass(frozen=True)
class Drift:
    field: str
    old: Any
    new: Any
    severity: Severity
    message: str


@dataclass(frozen=True)
class DriftReport:
    items: tuple[Drift, ...]

    @property
    def errors(self) -> tuple[Drift, ...]:
        return tuple(d for d in self.items if d.severity == "error")

    @property
    def warnings(self) -> tuple[Drift, ...]:
        return tuple(d for d in self.items if d.severity == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self, what: str = "this environment") -> None:
        if self.errors:
            lines = "; ".join(d.message for d in self.errors)
            raise EnvDriftError(
                f"{what} is incompatible: {lines}. Recreate the environment from environment.yml "
                "(`make env`) or re-capture the model here."
            )


_DISTS: tuple[tuple[tuple[str, int], ...], dict[str, str]] | None = None


def _path_stamp() -> tuple[tuple[str, int], ...]:
    """Where distributions are found, with each folder's mtime: an install or removal changes it."""
    stamp = []
    for entry in sys.path:
        try:
            stamp.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            continue
    return tuple(stamp)


def _distributions() -> dict[str, str]:
    """Installed distributions and versions; read once per process until sys.path's folders change
    (about 0.1 s a read: a service's master reads it before forking, so a worker's first load is fast)."""
    global _DISTS
    stamp = _path_stamp()
    if _DISTS is None or _DISTS[0] != stamp:
        out: dict[str, str] = {}
        for dist in importlib.metadata.distributions():
            name, version = _name_and_version(dist)
            if name:
                out[_norm(name)] = version
        _DISTS = (stamp, dict(sorted(out.items())))
    return dict(_DISTS[1])


def _name_and_version(dist: importlib.metadata.Distribution) -> tuple[str | None, str]:
    """From a ``<name>-<version>.dist-info`` folder's name (the wheel spec escapes '-' in the name), which
    is 100x faster than parsing every METADATA file; from the metadata for anything else (egg-info)."""
    folder = getattr(dist, "_path", None)
    if isinstance(folder, Path) and folder.name.endswith(".dist-info"):
        name, sep, version = folder.name.removesuffix(".dist-info").partition("-")
        if sep and name and version and "-" not in version:
            return name, version
    return dist.metadata["Name"], dist.version  # Name is None when missing (an email.message.Message)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _conda() -> tuple[str | None, str | None]:
    prefix = Path(sys.prefix)
    if (prefix / "conda-meta").is_dir():
        name = "base" if (prefix / "condabin").is_dir() else prefix.name
        return str(prefix), name
    return None, None


def _torch_versions() -> tuple[str | None, str | None]:
    # importlib.metadata avoids importing torch (the fingerprint is also taken in light processes);
    # the CUDA build is part of the local version label, e.g. 2.13.0+cu126 / +cpu.
    try:
        v = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    cuda = None
    if "torch" in sys.modules:
        cuda = getattr(sys.modules["torch"].version, "cuda", None)
    elif "+cu" in v:
        cuda = v.split("+cu", 1)[1]
    return v, cuda


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version (``onnxruntime`` or ``onnxruntime-gpu``), without importing it."""
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def fingerprint(project_root: Path | None = None) -> Fingerprint:
    """Fingerprint the running environment; hashes environment.yml and the lock under ``project_root``."""
    dists = _distributions()
    # The kit itself is excluded: its version changes with every commit in development.
    hashed = {k: v for k, v in dists.items() if k != "kit"}
    dist_sha = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    conda_prefix, conda_name = _conda()
    torch_v, cuda = _torch_versions()
    env_yml = lock = None
    if project_root is not None:
        p = Path(project_root) / "environment.yml"
        env_yml = sha256_file(p) if p.is_file() else None
        p = Path(project_root) / LOCK_RELPATH
        lock = sha256_file(p) if p.is_file() else None
    libc = "-".join(x for x in platform.libc_ver() if x) or "unknown"
    return Fingerprint(
        python=platform.python_version(),
        implementation=platform.python_implementation(),
        torch=torch_v,
        cuda=cuda,
        platform=f"{sys.platform}-{platform.machine()}",
        libc=libc,
        conda_prefix=conda_prefix,
        conda_name=conda_name,
        prefix=sys.prefix,
        distributions_sha256=dist_sha,
        distributions=hashed,
        environment_yml_sha256=env_yml,
        lock_sha256=lock,
        onnxruntime=onnxruntime_version(),
    )


def _release(v: str | None) -> tuple[int, ...] | None:
    if v is None:
        return None
    try:
        return Version(v).release
    except InvalidVersion:
        return None


def _version_drift(name: str, old: str | None, new: str | None, minor_is_error: bool) -> Drift | None:
    if old == new:
        return None
    if old is None or new is None:
        sev: Severity = "error" if minor_is_error else "warning"
        return Drift(name, old, new, sev, f"{name} {'added' if old is None else 'removed'} ({old} -> {new})")
    ro, rn = _release(old), _release(new)
    if ro is None or rn is None or ro[:2] != rn[:2]:
        sev = "error" if minor_is_error else "warning"
        return Drift(name, old, new, sev, f"{name} changed {old} -> {new}")
    if ro != rn:
        return Drift(name, old, new, "warning", f"{name} patch-level change {old} -> {new}")
    return Drift(name, old, new, "info", f"{name} build changed {old} -> {new}")


# the packages whose version decides whether a backend computes what was validated
_RUNTIME = {b.name: b.runtime for b in BACKENDS.values()}
_RUNTIME_DISTS = ("torch", "onnxruntime", "onnxruntime-gpu")


def diff(old: Fingerprint, new: Fingerprint, backend: str = "torch") -> DriftReport:
    """What changed from ``old`` (e.g. a version's recorded fingerprint) to ``new`` (here, now).

    ``backend`` is what will run the model: its runtime's version (torch, or onnxruntime) must keep its
    minor version (else an error); the other runtime's change, or absence, is information only (a server
    with onnxruntime need not have torch).
    """
    get_backend(backend)  # ConfigError (a ValueError) naming the choices
    items: list[Drift] = []
    d = _version_drift("python", old.python, new.python, minor_is_error=True)
    if d:
        items.append(d)
    for name, o, n in (("torch", old.torch, new.torch), ("onnxruntime", old.onnxruntime, new.onnxruntime)):
        d = _version_drift(name, o, n, minor_is_error=name == _RUNTIME[backend])
        if d and name != _RUNTIME[backend]:
            d = dataclasses.replace(d, severity="info", message=f"{d.message} (not used by backend {backend})")
        if d:
            items.append(d)
    if old.cuda != new.cuda and backend == "torch":
        items.append(Drift("cuda", old.cuda, new.cuda, "warning", f"CUDA build {old.cuda} -> {new.cuda}"))
    if old.platform != new.platform:
        items.append(
            Drift("platform", old.platform, new.platform, "error", f"platform {old.platform} -> {new.platform}")
        )
    if old.implementation != new.implementation:
        items.append(
            Drift("implementation", old.implementation, new.implementation, "error",
                  f"interpreter {old.implementation} -> {new.implementation}")
        )
    for pkg in sorted(set(old.distributions) | set(new.distributions)):
        if pkg in _RUNTIME_DISTS:
            continue
        d = _version_drift(pkg, old.distributions.get(pkg), new.distributions.get(pkg), minor_is_error=False)
        if d:
            items.append(d)
    for name, o, n in (
        ("environment.yml", old.environment_yml_sha256, new.environment_yml_sha256),
        ("lock", old.lock_sha256, new.lock_sha256),
    ):
        if o and n and o != n:
            items.append(Drift(name, o[:12], n[:12], "info", f"{name} changed ({o[:12]} -> {n[:12]})"))
    return DriftReport(tuple(items))


def read_lock(project_root: Path) -> Fingerprint | None:
    """The lock as a fingerprint (what :func:`diff` compares the running environment with), or None."""
    import json

    path = Path(project_root) / LOCK_RELPATH
    try:
        data = json.loads(path.read_text())
        dists = dict(data["distributions"])
        return Fingerprint(
            python=data["python"], implementation=data.get("implementation", "CPython"), torch=data.get("torch"),
            cuda=data.get("cuda"), platform=data["platform"], libc=data.get("libc", "unknown"),
            conda_prefix=None, conda_name=None, prefix=data.get("prefix", ""),
            distributions_sha256=hashlib.sha256(json.dumps(dists, sort_keys=True).encode()).hexdigest(),
            distributions=dists, onnxruntime=data.get("onnxruntime"),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvDriftError(f"{path} is not a readable lock ({exc}). Rewrite it with `make lock`.") from exc


def write_lock(project_root: Path) -> Path:
    """Write the lock of the exact running environment (``make lock``)."""
    fp = fingerprint(None)
    path = Path(project_root) / LOCK_RELPATH
    atomic_write_json(
        path,
        {
            "schema": SCHEMA,
            "python": fp.python,
            "implementation": fp.implementation,
            "platform": fp.platform,
            "libc": fp.libc,
            "prefix": fp.prefix,
            "torch": fp.torch,
            "cuda": fp.cuda,
            "onnxruntime": fp.onnxruntime,
            "distributions": fp.distributions,
        },
    )
    return path
