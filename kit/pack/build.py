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

Modules: :mod:`kit.pack.stage` (the service, the versions to ship and every check, staged files, the
manifest), :mod:`kit.pack.layer` (the cached environment member), :mod:`kit.pack.wheel` (kit's wheel),
:mod:`kit.pack.integrity` (file list, signatures); this one puts them in order and writes the archive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit._io import fsync_dir, sha256_file
from kit.errors import PackError
from kit.pack import envscan, integrity
from kit.pack import select as selecting
from kit.pack._common import Progress, human, say
from kit.pack._tar import SUFFIX, TarMember
from kit.pack.layer import editable_kit_files, env_layer
from kit.pack.runtime import MANIFEST
from kit.pack.stage import (
    ModelPlan,
    ServiceInfo,
    _render,
    check_environment,
    check_unit,
    manifest,
    plan_models,
    read_service,
    stage_files,
)
from kit.pack.wheel import build_kit_wheel, cached_kit_install
from kit.signing import Keyring, SigningKey

__all__ = ["PackResult", "ServiceInfo", "_render", "build_kit_wheel", "check_unit", "pack", "read_service"]


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
    backend: str = "torch"
    compression: str = "gzip"
    shipped: dict[str, str] = field(default_factory=dict)  # distribution -> version
    left_out: dict[str, str] = field(default_factory=dict)  # distribution -> why

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["archive"] = str(self.archive)
        return d




def _choose(prefix: Path, svc: ServiceInfo, include: tuple[str, ...], exclude: tuple[str, ...],
            progress: Progress | None, timings: dict[str, float]
            ) -> tuple[envscan.EnvScan, selecting.Selection, dict[str, Any]]:
    """The environment's scan, the shipped set (printed as the size table) and its fingerprint."""
    t = time.monotonic()
    s = envscan.scan(prefix)
    timings["inspect"] = time.monotonic() - t
    envscan.raise_problems(envscan.check_kit(s), s.prefix)
    sel = selecting.select(s, svc.backend, selecting.read_pack_settings(svc.directory, include, exclude),
                           extras=("s3",) if isinstance(svc.registry, str) else ())  # a bucket: obstore too
    for line in selecting.report(sel):
        say(progress, line)
    timings["select"] = time.monotonic() - t - timings["inspect"]
    return s, sel, selecting.shipped_fingerprint(s.fingerprint or {}, sel)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _kit_wheel(s: envscan.EnvScan, stage: Path, tmp: Path, cache_dir: Path,
               progress: Progress | None) -> tuple[Path | None, str | None]:
    """kit as a built wheel (an editable kit points at the checkout, which the server lacks): the folder
    of its installed files and the wheel's path in the archive; (None, None) for a kit installed as a package."""
    kit_dist = s.dist("kit")
    assert kit_dist is not None
    if not kit_dist.editable_source:
        say(progress, f"kit {kit_dist.version} is installed as a package in {s.prefix}; packing it as it is")
        return None, None
    kit_install = tmp / "kit-install"
    wheel = cached_kit_install(Path(kit_dist.editable_source), stage / "wheels", kit_install, cache_dir, progress)
    return kit_install, f"wheels/{wheel.name}"


def _write_archive(archive: Path, layer: Path, stage: Path, stem: str, doc: dict[str, Any],
                   kit_install: Path | None, site_packages: str, env_listing: tuple[Any, Any], signer: Any,
                   compresslevel: int, compression: str) -> Any:
    """The environment layer, kit's files, the staged service and models and the manifest, written to a
    temporary file beside ``archive`` and moved into place whole; returns the integrity record."""
    out_dir = archive.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f".{archive.name}.tmp-{os.getpid()}"
    try:
        with open(part, "wb") as f:
            with open(layer, "rb") as lf:
                shutil.copyfileobj(lf, f, 1 << 22)
            member = TarMember(f, compresslevel, codec=compression)
            if kit_install is not None:  # kit from its wheel, into the environment's site-packages
                for p in sorted(kit_install.rglob("*")):
                    member.add_path(p, f"{stem}/env/{site_packages}/{p.relative_to(kit_install)}")
            for p in sorted(stage.rglob("*")):
                member.add_path(p, f"{stem}/{p.relative_to(stage)}")
            member.add_bytes(f"{stem}/{MANIFEST}", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
            checked = integrity.add_to_archive(member, stem, *env_listing, signer)
            member.close(end_of_archive=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, archive)
        integrity.sign_archive(archive, signer)
        fsync_dir(out_dir)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return checked


def _stage(stage: Path, tmp: Path, svc: ServiceInfo, plan: ModelPlan, s: envscan.EnvScan, sel: selecting.Selection,
           shipped_fp: dict[str, Any], *, stem: str, cache_dir: Path, bind: str, warnings: list[str],
           forced: list[str], signer: SigningKey | None, progress: Progress | None, timings: dict[str, float]
           ) -> tuple[Path | None, dict[str, int], dict[str, Any]]:
    """Kit's wheel, the service and the models into ``stage``; (kit's install, part sizes, the manifest)."""
    t = time.monotonic()
    kit_install, wheel_rel = _kit_wheel(s, stage, tmp, cache_dir, progress)
    timings["wheel"] = time.monotonic() - t
    ctx, unit_check = stage_files(stage, svc, plan, s, bind=bind, warnings=warnings)
    sizes = {part: _tree_bytes(stage / folder) for part, folder in (("service", "service"), ("models", "registry"))}
    files = {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    doc = manifest(svc=svc, plan=plan, s=s, stem=stem, created=ctx["created"], files=files, wheel_rel=wheel_rel,
                   warnings=warnings, forced=forced, unit_check=unit_check,
                   signed_by=signer.key_id if signer is not None else None, selection=sel.to_dict(),
                   env=shipped_fp)
    return kit_install, sizes, doc


def pack(
    service_dir: Path,
    *,
    out_dir: Path = Path("dist"),
    force: bool = False,
    progress: Progress | None = None,
    env_prefix: Path | None = None,
    registry: Path | str | None = None,
    target_platform: str | None = None,
    compresslevel: int = 4,
    cache_dir: Path | None = None,
    bind: str = "0.0.0.0:8000",
    keyring: Keyring | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    compression: str = "gzip",
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
    registry : the registry to take models from (a folder or ``s3://bucket/prefix``); default: the one named
        in ``service.toml``.
    target_platform : refuse unless the environment is for this platform (e.g. ``linux-x86_64``).
    compresslevel : compression level for the archive (gzip 1 fast .. 9 small; zstd the same numbers).
    compression : ``"gzip"`` (``.tar.gz``, every server unpacks it) or ``"zstd"`` (``.tar.zst``, every core:
        about 9x faster to pack and 15x to unpack, 14% smaller; the server needs zstd). See docs/pack.md.
    cache_dir : where environment layers are kept for the next pack; default ``out_dir/.layers``.
    bind : the ``KIT_BIND`` the systemd unit sets.
    keyring : verifies the models' signatures and signs the archive's file list (kit-pack.sha256.sig) and
        ``<archive>.sha256.sig`` with its key; None: unsigned (run.sh then refuses it under KIT_TRUST).
    include, exclude : distributions added to / removed from the shipped set, on top of the service's
        ``pack.toml`` (:mod:`kit.pack.select`: the closure of what the service's backend requires).
    """
    if compression not in SUFFIX:
        raise PackError(f"unknown compression {compression!r}; use gzip or zstd.")
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    from kit.registry.storage import is_url

    svc = read_service(Path(service_dir))
    reg_root = svc.registry if registry is None else registry if is_url(registry) else Path(registry).absolute()
    out_dir = Path(out_dir).absolute()
    cache_dir = (out_dir / ".layers") if cache_dir is None else Path(cache_dir)
    prefix = Path(env_prefix).absolute() if env_prefix is not None else envscan.running_prefix()
    signer = keyring.signer() if keyring is not None and keyring.can_sign() else None
    plan = plan_models(svc, reg_root, keyring)

    say(progress, f"inspecting the environment {prefix}")
    s, sel, shipped_fp = _choose(prefix, svc, include, exclude, progress, timings)
    warnings, forced = check_environment(selecting.shipped_scan(s, sel), plan, force=force, progress=progress,
                                         target_platform=target_platform, env_fp=shipped_fp, backend=svc.backend)
    stem = f"{svc.name}-{plan.label}-{s.platform}"
    archive = out_dir / f"{stem}{SUFFIX[compression]}"

    with tempfile.TemporaryDirectory(prefix="kit-pack-") as tmp_s:
        tmp = Path(tmp_s)
        stage = tmp / "stage"
        stage.mkdir()
        kit_install, sizes, doc = _stage(stage, tmp, svc, plan, s, sel, shipped_fp, stem=stem, cache_dir=cache_dir,
                                         bind=bind, warnings=warnings, forced=forced, signer=signer,
                                         progress=progress, timings=timings)

        # -- the environment layer, then the archive
        t = time.monotonic()
        layer, reused, env_bytes, (env_files, env_links) = env_layer(
            s, f"{stem}/env", editable_kit_files(s) | set(sel.exclude_paths), compresslevel, cache_dir, force, tmp,
            progress, codec=compression)
        timings["env_layer"] = time.monotonic() - t
        sizes["env"] = env_bytes
        say(progress, "size report: " + ", ".join(f"{k} {human(v)}" for k, v in sizes.items()))
        t = time.monotonic()
        try:
            checked = _write_archive(archive, layer, stage, stem, doc, kit_install, s.site_packages,
                                     (env_files, env_links), signer, compresslevel, compression)
        finally:
            if not reused and layer.parent == tmp:
                layer.unlink(missing_ok=True)
        timings["archive"] = time.monotonic() - t

    size = archive.stat().st_size
    seconds = time.monotonic() - t0
    say(progress, f"wrote {archive} ({human(size)}, {s.kind} environment, models "
                  f"{', '.join(mv.ref for mv in plan.mvs)}) in {seconds:.1f}s")
    return PackResult(archive=archive, size_bytes=size, kind=s.kind, seconds=round(seconds, 2),
                      models={svc.model: plan.versions}, service=svc.name, label=plan.label, root=stem,
                      env_bytes=env_bytes, layer_cached=reused, sizes=sizes, warnings=tuple(warnings),
                      forced=tuple(forced), timings={k: round(v, 2) for k, v in timings.items()},
                      signed_by=signer.key_id if signer is not None else None, checked_files=checked,
                      backend=svc.backend, shipped=sel.shipped, left_out=sel.left_out, compression=compression)
