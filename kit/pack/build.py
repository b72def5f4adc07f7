"""``pack()``: one archive holding the environment, kit as a built wheel, the service and its models.

Layout of ``dist/<service>-<label>-<platform>.tar.gz`` (label: ``v3``, or ``v3-canary4``)::

    <service>-<label>-<platform>/
        env/                  the environment (conda-pack'ed; or the venv fallback), kit installed from its wheel
        service/              the generated service, byte for byte
        registry/<model>/     aliases.json, events.jsonl and versions/<n>/ for the production and canary versions
        wheels/kit-*.whl      the wheel kit was installed from
        run.sh                relocate (conda-unpack), verify, then ``env/bin/python -m gunicorn``
        <service>.service.in  systemd unit (``./run.sh systemd-unit`` fills in the folder)
        kit-pack.json         manifest: sha256 of every shipped file, the environment's fingerprint, checks

The environment is written as its own gzip member and cached (keyed by a stat of every file and the
archive root); kit's wheel-installed files, the service and the models follow in a second member. So
packing again with an unchanged environment takes seconds, even after kit itself changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kit
from kit._io import fsync_dir, sha256_file
from kit.errors import KitError, PackError, UnsafeArtifactError
from kit.pack import envscan, integrity
from kit.pack._tar import TarMember
from kit.pack.runtime import MANIFEST
from kit.signing import Keyring

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
FORMAT_VERSION = 1
_KEEP_LAYERS = 3
_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store"}


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote."""

    archive: Path
    size_bytes: int
    kind: str  # "conda" | "venv"
    seconds: float
    models: dict[str, list[int]]
    service: str = ""
    label: str = ""
    root: str = ""  # the folder the archive extracts to
    env_bytes: int = 0
    layer_cached: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    signed_by: str | None = None  # the key that signed kit-pack.sha256 and <archive>.sha256
    checked_files: int = 0  # files run.sh checks with sha256sum before any interpreter starts

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["archive"] = str(self.archive)
        return d


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    model: str
    registry: Path
    directory: Path


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def read_service(service_dir: Path) -> ServiceInfo:
    """The service's name, model and registry, from ``service.toml``."""
    service_dir = Path(service_dir).absolute()
    toml = service_dir / "service.toml"
    if not toml.is_file():
        raise PackError(f"{service_dir} has no service.toml, so it is not a generated service. Generate one "
                        "with `kit service generate NAME MODEL` (or `make demo`), then pack services/NAME.")
    try:
        with open(toml, "rb") as f:
            cfg = tomllib.load(f)
        name = str(cfg.get("service", {}).get("name") or service_dir.name)
        model = str(cfg["model"]["name"])
        reg = Path(str(cfg["model"].get("registry", "registry")))
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise PackError(f"{toml} lacks [model] name (or is not valid TOML: {exc}). Regenerate the service.") from exc
    if not reg.is_absolute():
        reg = (service_dir / reg).resolve()
    return ServiceInfo(name, model, reg, service_dir)


# --------------------------------------------------------------------------- kit's wheel


def _source_files(src: Path) -> Iterator[Path]:
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (src / name).is_file():
            yield src / name
    for pat in ("README*", "LICENSE*"):
        yield from sorted(p for p in src.glob(pat) if p.is_file())
    for dirpath, dirnames, filenames in os.walk(src / "kit"):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES)
        for fn in sorted(filenames):
            if not fn.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / fn


def build_kit_wheel(source: Path, out_dir: Path, progress: Progress | None = None) -> Path:
    """Build kit's wheel from a copy of ``source`` (the checkout is never written to)."""
    source = Path(source)
    if not (source / "pyproject.toml").is_file() or not (source / "kit").is_dir():
        raise PackError(f"kit's source folder {source} (from its editable install) has no pyproject.toml "
                        "and kit/; reinstall kit with `pip install -e <checkout>` or install a kit wheel.")
    _say(progress, f"building kit's wheel from {source}")
    with tempfile.TemporaryDirectory(prefix="kit-wheel-src-") as tmp:
        copy = Path(tmp) / "src"
        for p in _source_files(source):
            dest = copy / p.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-q", "-w", str(out_dir), str(copy)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise PackError(f"Building kit's wheel failed ({' '.join(cmd[:6])} ...): {res.stderr.strip()[-800:]}. "
                            "pip and setuptools must be installed where kit pack runs (`make env`).")
    wheels = sorted(out_dir.glob("kit-*.whl"))
    if not wheels:
        raise PackError(f"pip reported success but wrote no kit wheel into {out_dir}.")
    return wheels[-1]


def install_wheel(wheel: Path, target: Path) -> list[Path]:
    """Install ``wheel`` into ``target`` (a site-packages layout); returns the installed files."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
           "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise PackError(f"Installing {wheel.name} for the archive failed: {res.stderr.strip()[-800:]}")
    shutil.rmtree(target / "bin", ignore_errors=True)  # scripts would point at this interpreter; run.sh uses -m
    # direct_url.json would name this pack's temporary folder: drop it (and its RECORD line) so the
    # installed files depend on kit's source only.
    for du in target.glob("*.dist-info/direct_url.json"):
        du.unlink()
        rec = du.parent / "RECORD"
        if rec.is_file():
            keep = [ln for ln in rec.read_text().splitlines() if not ln.startswith(f"{du.parent.name}/direct_url.json,")]
            rec.write_text("\n".join(keep) + "\n")
    return sorted(p for p in target.rglob("*") if p.is_file() or p.is_symlink())


# --------------------------------------------------------------------------- the environment layer


def _walk(prefix: Path, exclude: set[str]) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``prefix`` (relative path, lstat), sorted, directories before their content."""
    for dirpath, dirnames, filenames in os.walk(prefix):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, prefix)
        keep = []
        for d in dirnames:
            rel = os.path.normpath(os.path.join(rel_dir, d))
            st = os.lstat(os.path.join(dirpath, d))
            if rel in exclude:
                continue
            yield rel, st
            if not os.path.islink(os.path.join(dirpath, d)):
                keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, fn))
            if rel not in exclude:
                yield rel, os.lstat(os.path.join(dirpath, fn))


def editable_kit_files(s: envscan.EnvScan) -> set[str]:
    """Paths (relative to the prefix) of an editable kit install, which the wheel replaces."""
    d = s.dist("kit")
    if d is None or not d.editable_source:
        return set()
    out = {os.path.normpath(p) for p in d.record}
    out.add(os.path.normpath(d.meta_dir))
    site = s.prefix / s.site_packages
    for p in (site / "__pycache__").glob("__editable__*kit*") if (site / "__pycache__").is_dir() else ():
        out.add(os.path.relpath(p, s.prefix))
    return out


def _layer_key(s: envscan.EnvScan, exclude: set[str], kit_files: dict[str, str], arc_env: str,
               compresslevel: int) -> tuple[str, int, dict[str, int]]:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, str(s.prefix), s.kind, arc_env, compresslevel,
                         sorted(exclude), sorted(kit_files.items()), _conda_pack_version()]).encode())
    total = 0
    sizes: dict[str, int] = {}
    for rel, st in _walk(s.prefix, exclude):
        link = os.readlink(s.prefix / rel) if os.path.islink(s.prefix / rel) else ""
        h.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n".encode("utf-8", "surrogateescape"))
        if not link and os.path.isfile(s.prefix / rel):
            total += st.st_size
            sizes[rel] = st.st_size
    return h.hexdigest(), total, sizes


def _conda_pack_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("conda-pack")
    except Exception:  # not installed: only venvs can be packed, and the key says so
        return None


class _Meter:
    """Progress lines every 10% of the environment's bytes (a tqdm bar costs nothing in a log file)."""

    def __init__(self, total: int, progress: Progress | None, what: str):
        self.total, self.progress, self.what = max(total, 1), progress, what
        self.done, self.next_pct, self.t0 = 0, 10, time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if pct >= self.next_pct:
            self.next_pct = (pct // 10 + 1) * 10
            rate = self.done / max(time.monotonic() - self.t0, 1e-6)
            _say(self.progress, f"{self.what}: {min(pct, 100)}% ({human(self.done)} of {human(self.total)}, "
                                f"{human(rate)}/s)")


def _write_venv_layer(member: TarMember, s: envscan.EnvScan, exclude: set[str], arc_env: str) -> None:
    for rel, _st in _walk(s.prefix, exclude):
        member.add_path(s.prefix / rel, f"{arc_env}/{rel}")


def _write_conda_layer(member: TarMember, s: envscan.EnvScan, exclude: set[str], arc_env: str,
                       ignore_missing: bool, tmp: Path) -> None:
    try:
        from conda_pack import CondaEnv, CondaPackException
    except ImportError as exc:
        raise PackError("Packing a conda environment needs conda-pack where kit pack runs: "
                        "`pip install conda-pack` (or `pip install kit[pack]`).") from exc
    try:
        env = CondaEnv.from_prefix(str(s.prefix), ignore_editable_packages=bool(exclude),
                                   ignore_missing_files=ignore_missing)
        for rel in sorted(exclude):
            env = env.exclude(rel)
            env = env.exclude(rel + "/*")
        out = tmp / "conda-pack.tar"
        env.pack(output=str(out), format="tar", arcroot="", force=True, verbose=False)
    except CondaPackException as exc:
        raise PackError(f"conda-pack refused {s.prefix}: {exc}") from exc
    with tarfile.open(out, "r:") as tf:
        for ti in tf:
            ti.name = f"{arc_env}/{ti.name.lstrip('./')}" if ti.name not in (".", "") else arc_env
            if ti.islnk():
                ti.linkname = f"{arc_env}/{ti.linkname}"
            member.add_member(ti, tf.extractfile(ti) if ti.isreg() else None)
    out.unlink()


def _env_layer(s: envscan.EnvScan, arc_env: str, exclude: set[str], compresslevel: int, cache_dir: Path | None, force: bool, tmp: Path,
               progress: Progress | None) -> tuple[Path, bool, int, tuple[dict[str, str], dict[str, str]]]:
    """Write (or reuse) the environment's gzip member; returns (file, reused, env bytes, (file sha256s, links))."""
    # kit's own files go into the second member (see pack), so editing kit does not invalidate this layer.
    key, total, _sizes = _layer_key(s, exclude, {}, arc_env, compresslevel)
    if cache_dir is not None:
        cached = cache_dir / f"env-{key[:32]}.gz"
        digests = integrity.read_layer_digests(cached)
        if cached.is_file() and digests is not None:
            os.utime(cached)
            _say(progress, f"environment unchanged since an earlier pack: reusing {cached}")
            return cached, True, total, digests
    out = (cache_dir or tmp) / f".env-{key[:32]}.gz.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    verb = "conda-pack" if s.kind == "conda" else "packing the venv"
    _say(progress, f"{verb}: {s.prefix} ({human(total)} in files) -> {arc_env}/")
    meter = _Meter(total, progress, verb)
    try:
        with open(out, "wb") as f:
            member = TarMember(f, compresslevel, on_bytes=meter)
            if s.kind == "conda":
                _write_conda_layer(member, s, exclude, arc_env, force, tmp)
            else:
                _write_venv_layer(member, s, exclude, arc_env)
            member.close(end_of_archive=False)
            digests = (member.hashes, member.links)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if cache_dir is None:
        return out, False, total, digests
    final = cache_dir / f"env-{key[:32]}.gz"
    integrity.write_layer_digests(final, *digests)  # first: a layer without its digests is never reused
    os.replace(out, final)
    for old in sorted(cache_dir.glob("env-*.gz"), key=lambda p: p.stat().st_mtime, reverse=True)[_KEEP_LAYERS:]:
        old.unlink(missing_ok=True)
        integrity.digests_path(old).unlink(missing_ok=True)
    return final, False, total, digests


# --------------------------------------------------------------------------- the small parts


def _copy_tree(src: Path, dest: Path, skip: Callable[[Path], bool] = lambda p: False) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES and not skip(Path(dirpath) / d))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.endswith((".pyc", ".pyo")) or fn in _SKIP_NAMES or skip(p):
                continue
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


def _stage_models(registry_root: Path, model: str, versions: list[int], dest: Path) -> None:
    src = registry_root / model
    out = dest / model
    out.mkdir(parents=True)
    for fn in ("aliases.json", "events.jsonl"):
        if (src / fn).is_file():
            shutil.copy2(src / fn, out / fn)
    for v in versions:
        _copy_tree(src / "versions" / str(v), out / "versions" / str(v),
                   skip=lambda p: p.name.startswith((".tmp", ".lock")))


def _git_source(path: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=False)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {}


def _render(template: str, **ctx: Any) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("kit", "templates/pack"), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template(template).render(**ctx)


def check_unit(unit_text: str, root: Path) -> str | None:
    """``systemd-analyze verify`` the unit as it will be installed at ``root``; None when unavailable."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="kit-unit-") as tmp:
        unit = Path(tmp) / "kit-check.service"
        unit.write_text(unit_text.replace("@KIT_ROOT@", str(root)))
        res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise PackError(f"systemd-analyze verify rejected the generated unit: {out[-800:]}")
    return out or "ok"


# --------------------------------------------------------------------------- pack


def pack(
    service_dir: Path,
    *,
    out_dir: Path = Path("dist"),
    force: bool = False,
    progress: Progress | None = None,
    env_prefix: Path | None = None,
    registry: Path | None = None,
    target_platform: str | None = None,
    compresslevel: int = 4,
    cache_dir: Path | None = None,
    bind: str = "0.0.0.0:8000",
    keyring: Keyring | None = None,
) -> PackResult:
    """Pack ``service_dir``, its environment and the model versions its aliases name.

    Parameters
    ----------
    service_dir : a generated service folder (``services/NAME``, with ``service.toml``).
    out_dir : where ``NAME-<label>-<platform>.tar.gz`` is written (atomically).
    force : pack despite clobbered conda files or a model whose recorded environment is incompatible
        (each overridden refusal is recorded in the archive's manifest).
    progress : called with one line per step (and every 10% of the environment).
    env_prefix : the environment to pack; default: the one running this code.
    registry : the registry to take models from; default: the one named in ``service.toml``.
    target_platform : refuse unless the environment is for this platform (e.g. ``linux-x86_64``).
    compresslevel : gzip level for the archive (1 fast .. 9 small).
    cache_dir : where environment layers are kept for the next pack; default ``out_dir/.layers``.
    bind : the ``KIT_BIND`` the systemd unit sets.
    keyring : verifies the models' signatures and signs the archive's file list (kit-pack.sha256.sig) and
        ``<archive>.sha256.sig`` with its key; None: unsigned (run.sh then refuses it under KIT_TRUST).
    """
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    svc = read_service(Path(service_dir))
    reg_root = Path(registry).absolute() if registry is not None else svc.registry
    out_dir = Path(out_dir).absolute()
    cache_dir = (out_dir / ".layers") if cache_dir is None else Path(cache_dir)
    prefix = Path(env_prefix).absolute() if env_prefix is not None else envscan.running_prefix()
    warnings: list[str] = []
    forced: list[str] = []

    # -- models: the versions the aliases name, verified before anything is written
    from kit.artifacts import check_version_files
    from kit.registry import Registry

    signer = keyring.signer() if keyring is not None and keyring.can_sign() else None
    reg = Registry(reg_root, require_gate=True, user="kit-pack", keyring=keyring)  # signatures checked too
    try:
        aliases = reg.aliases(svc.model)
    except KitError as exc:
        raise PackError(f"Service {svc.name!r} serves model {svc.model!r}, which the registry {reg_root} cannot "
                        f"provide ({exc}).") from exc
    if aliases.production is None:
        raise PackError(f"Model {svc.model!r} has no production version in {reg_root}, so service {svc.name!r} "
                        f"would serve nothing. Promote one first: `kit promote {svc.model}@N`.")
    versions = [aliases.production] + ([aliases.canary] if aliases.canary not in (None, aliases.production) else [])
    mvs = [reg.get(svc.model, v) for v in versions]
    for res in reg.verify(svc.model, None):
        if int(res.ref.rsplit("@", 1)[1]) in versions and not res.ok:
            raise PackError(f"{res.ref} failed verification ({'; '.join(res.problems)}); it will not be shipped. "
                            f"Run `kit verify {res.ref}` and restore or re-register it.")
    for mv in mvs:  # what a server checks before torch reads a byte: no pickle, no code, bounded size
        try:
            check_version_files(mv.path)
        except UnsafeArtifactError as exc:
            raise PackError(f"{mv.ref} will not be shipped: {exc}") from exc
    label = f"v{aliases.production}" + (f"-canary{aliases.canary}" if len(versions) > 1 else "")

    # -- the environment, and every check that can refuse it
    _say(progress, f"inspecting the environment {prefix}")
    t = time.monotonic()
    s = envscan.scan(prefix)
    timings["inspect"] = time.monotonic() - t
    envscan.raise_problems(envscan.check_kit(s) + envscan.check_history(s) + envscan.check_editable(s)
                           + envscan.check_platform(s, target_platform), prefix)
    clobbered = envscan.check_conda_files(s)
    if clobbered and not force:
        envscan.raise_problems(clobbered, prefix, forcible=True)
    forced += [p.message for p in clobbered]

    from kit.env import Fingerprint, diff

    assert s.fingerprint is not None  # check_kit
    env_fp = Fingerprint.from_dict(s.fingerprint)
    for mv in mvs:
        report = diff(Fingerprint.from_dict(mv.env), env_fp)
        for d in report.warnings:
            warnings.append(f"{mv.ref}: {d.message}")
        if report.errors:
            msg = (f"{mv.ref} was captured in an environment this one is incompatible with: "
                   f"{'; '.join(d.message for d in report.errors)}")
            if not force:
                raise PackError(f"{msg}. The server would refuse to load it. Pack from the environment the "
                                "model was captured in, re-capture the model here, or force the pack "
                                "(recorded in its manifest).", remedy="force")
            forced.append(msg)
    for w in warnings:
        _say(progress, f"warning: {w}")
    for f_ in forced:
        _say(progress, f"forced: {f_}")

    platform_tag = s.platform
    stem = f"{svc.name}-{label}-{platform_tag}"
    archive = out_dir / f"{stem}.tar.gz"
    exclude = editable_kit_files(s)

    with tempfile.TemporaryDirectory(prefix="kit-pack-") as tmp_s:
        tmp = Path(tmp_s)
        stage = tmp / "stage"
        stage.mkdir()
        # -- kit as a built wheel (an editable kit points at the checkout, which the server lacks)
        kit_install: Path | None = None
        wheel_rel: str | None = None
        kit_dist = s.dist("kit")
        assert kit_dist is not None
        if kit_dist.editable_source:
            t = time.monotonic()
            wheel = build_kit_wheel(Path(kit_dist.editable_source), stage / "wheels", progress)
            kit_install = tmp / "kit-install"
            install_wheel(wheel, kit_install)
            wheel_rel = f"wheels/{wheel.name}"
            timings["wheel"] = time.monotonic() - t
        else:
            _say(progress, f"kit {kit_dist.version} is installed as a package in {prefix}; packing it as it is")

        # -- service, models, run.sh, unit
        _copy_tree(svc.directory, stage / "service")
        _stage_models(reg_root, svc.model, versions, stage / "registry")
        ctx = dict(service=svc.name, label=label, kit_version=kit.__version__, kind=s.kind,
                   created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   python=s.python, platform=platform_tag, base_interpreter=s.base_interpreter,
                   unit=f"kit-{svc.name}.service", bind=bind)
        (stage / "run.sh").write_text(_render("run.sh.j2", **ctx))
        (stage / "run.sh").chmod(0o755)
        unit_text = _render("unit.service.j2", **ctx)
        (stage / f"{svc.name}.service.in").write_text(unit_text)
        unit_check = check_unit(unit_text, stage)
        if unit_check is None:
            warnings.append("systemd-analyze is not installed here; the systemd unit was not verified")

        sizes = {
            "service": sum(p.stat().st_size for p in (stage / "service").rglob("*") if p.is_file()),
            "models": sum(p.stat().st_size for p in (stage / "registry").rglob("*") if p.is_file()),
        }
        files = {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        manifest = {
            "format": "kit-pack", "schema": FORMAT_VERSION, "service": svc.name, "label": label,
            "root": stem, "kind": s.kind, "platform": platform_tag, "python": s.python,
            "base_interpreter": s.base_interpreter, "created": ctx["created"],
            "kit": {"version": kit.__version__, "wheel": wheel_rel,
                    "source": _git_source(Path(kit_dist.editable_source)) if kit_dist.editable_source else {}},
            "models": {svc.model: {"production": aliases.production, "canary": aliases.canary,
                                   "canary_weight": aliases.canary_weight, "versions": versions,
                                   "artifact_sha256": {str(mv.version): mv.artifact_sha256 for mv in mvs}}},
            "files": files, "env": s.fingerprint, "warnings": warnings, "forced": forced,
            "packed_on": {"host": socket.gethostname(), "prefix": str(prefix)},
            "systemd_analyze": unit_check, "signed_by": signer.key_id if signer is not None else None,
        }

        # -- the environment layer, then the archive
        t = time.monotonic()
        layer, reused, env_bytes, (env_files, env_links) = _env_layer(
            s, f"{stem}/env", exclude, compresslevel, cache_dir, force, tmp, progress)
        timings["env_layer"] = time.monotonic() - t
        sizes["env"] = env_bytes
        _say(progress, "size report: " + ", ".join(f"{k} {human(v)}" for k, v in sizes.items())
             + f"; largest packages: {_largest(s)}")
        t = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        part = out_dir / f".{archive.name}.tmp-{os.getpid()}"
        try:
            with open(part, "wb") as f:
                with open(layer, "rb") as lf:
                    shutil.copyfileobj(lf, f, 1 << 22)
                member = TarMember(f, compresslevel)
                if kit_install is not None:  # kit from its wheel, into the environment's site-packages
                    for p in sorted(kit_install.rglob("*")):
                        member.add_path(p, f"{stem}/env/{s.site_packages}/{p.relative_to(kit_install)}")
                for p in sorted(stage.rglob("*")):
                    member.add_path(p, f"{stem}/{p.relative_to(stage)}")
                member.add_bytes(f"{stem}/{MANIFEST}", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
                checked = integrity.add_to_archive(member, stem, env_files, env_links, signer)
                member.close(end_of_archive=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, archive)
            integrity.sign_archive(archive, signer)
            fsync_dir(out_dir)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            if not reused and layer.parent == tmp:
                layer.unlink(missing_ok=True)
        timings["archive"] = time.monotonic() - t

    size = archive.stat().st_size
    seconds = time.monotonic() - t0
    _say(progress, f"wrote {archive} ({human(size)}, {s.kind} environment, models "
                   f"{', '.join(mv.ref for mv in mvs)}) in {seconds:.1f}s")
    return PackResult(archive=archive, size_bytes=size, kind=s.kind, seconds=round(seconds, 2),
                      models={svc.model: versions}, service=svc.name, label=label, root=stem,
                      env_bytes=env_bytes, layer_cached=reused, sizes=sizes, warnings=tuple(warnings),
                      forced=tuple(forced), timings={k: round(v, 2) for k, v in timings.items()},
                      signed_by=signer.key_id if signer is not None else None, checked_files=checked)


def _largest(s: envscan.EnvScan, n: int = 4) -> str:
    sizes = []
    for d in s.dists:
        total = 0
        for rel in d.record:
            try:
                total += os.lstat(s.prefix / rel).st_size
            except OSError:
                pass
        sizes.append((total, d.name))
    return ", ".join(f"{name} {human(sz)}" for sz, name in sorted(sizes, reverse=True)[:n])
