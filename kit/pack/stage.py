"""What goes into an archive, checked before anything is written: the service, the model versions its
aliases name (verified, safe to open), the environment's checks, the staged files and the manifest."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit._version import __version__ as kit_version
from kit.errors import KitError, PackError, UnsafeArtifactError
from kit.pack import envscan
from kit.pack._common import FORMAT_VERSION, SKIP_NAMES, Progress, say
from kit.registry.moves import MoveStorage
from kit.service_settings import SERVICE_FILE, read_service_toml
from kit.signing import Keyring


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    model: str
    registry: Path | str  # a folder, or an s3://bucket/prefix URL
    directory: Path
    backend: str = "torch"  # [model] backend: what the workers run (decides the shipped set)


def read_service(service_dir: Path) -> ServiceInfo:
    """The service's name, model and registry, from ``service.toml`` (read and checked as the service will)."""
    service_dir = Path(service_dir).absolute()
    if not (service_dir / SERVICE_FILE).is_file():
        raise PackError(f"{service_dir} has no service.toml, so it is not a generated service. Generate one "
                        "with `kit service generate NAME MODEL` (or `make demo`), then pack services/NAME.")
    from kit.registry.storage import is_url

    doc = read_service_toml(service_dir, error=PackError)
    reg: Path | str = str(doc["model"]["registry"])
    if not is_url(reg):
        reg = Path(reg) if Path(reg).is_absolute() else (service_dir / reg).resolve()
    return ServiceInfo(doc["service"]["name"], doc["model"]["name"], reg, service_dir,
                       str(doc["model"].get("backend", "torch")))


class MoveSnapshot(MoveStorage):
    """A model's aliases.json and move records as read once (the bytes :func:`plan_models` verified), read
    back by the same checks and written into the archive by :func:`stage_models`, never read again from the
    registry: a move made in between cannot make the archive's aliases name a version it does not ship."""

    def __init__(self, live: MoveStorage):
        super().__init__(live.model_dir)
        self.pointer_bytes = live.read_pointer()  # first: every record it names or follows was created before it
        self.records = {n: data for n in live.serials() if (data := live.read(n)) is not None}

    def read(self, serial: int) -> bytes | None:
        return self.records.get(serial)

    def read_pointer(self) -> bytes | None:
        return self.pointer_bytes

    def serials(self) -> list[int]:
        return sorted(self.records)

    def create(self, serial: int, data: bytes) -> bool:
        raise PackError("A pack's snapshot of the move records is read-only.")

    def write_pointer(self, data: bytes) -> None:
        raise PackError("A pack's snapshot of the move records is read-only.")


@dataclass(frozen=True)
class ModelPlan:
    """The versions to ship: production, and the canary when there is one, as ``registry`` verified them;
    ``moves``: the aliases.json and move records whose verification named them (what the archive carries)."""

    model: str
    aliases: Any  # kit.registry.Aliases
    versions: list[int]
    mvs: list[Any]  # kit.registry.ModelVersion, in ``versions`` order
    label: str  # v3, or v3-canary4
    registry: Any = None  # the kit.registry.Registry they come from (a bucket's: its files in this host's copy)
    moves: MoveSnapshot | None = None


def plan_models(svc: ServiceInfo, reg_root: Path | str, keyring: Keyring | None) -> ModelPlan:
    """The versions the aliases name, verified (sha256, signatures, safe to open) before anything is written.
    From a bucket (``s3://...``) each one is downloaded once per host into the local verified cache while
    hashed, like a load, and linked into the registry's local copy that :func:`stage_models` packs."""
    from kit.backends.pt2.archive import check_version_files
    from kit.registry import Registry

    reg = Registry(reg_root, require_gate=True, user="kit-pack", keyring=keyring)  # signatures checked too
    try:
        live = reg.movelog(svc.model)
        moves = MoveSnapshot(live.storage)  # read once: verified here, staged as read
        aliases = dataclasses.replace(live, storage=moves, floor=0, memo={}).current()
    except KitError as exc:
        raise PackError(f"Service {svc.name!r} serves model {svc.model!r}, which the registry {reg_root} cannot "
                        f"provide ({exc}).") from exc
    if aliases.production is None:
        raise PackError(f"Model {svc.model!r} has no production version in {reg_root}, so service {svc.name!r} "
                        f"would serve nothing. Promote one first: `kit promote {svc.model}@N`.")
    versions = [aliases.production] + ([aliases.canary] if aliases.canary not in (None, aliases.production) else [])
    mvs = [reg.get(svc.model, v) for v in versions]
    for res in (r for v in versions for r in reg.verify(svc.model, v)):  # only what ships
        if not res.ok:
            raise PackError(f"{res.ref} failed verification ({'; '.join(res.problems)}); it will not be shipped. "
                            f"Run `kit verify {res.ref}` and restore or re-register it.")
    for mv in mvs:  # what a server checks before torch reads a byte: no pickle, no code, bounded size
        try:
            check_version_files(mv.path)
        except UnsafeArtifactError as exc:
            raise PackError(f"{mv.ref} will not be shipped: {exc}") from exc
    label = f"v{aliases.production}" + (f"-canary{aliases.canary}" if len(versions) > 1 else "")
    return ModelPlan(svc.model, aliases, versions, mvs, label, reg, moves)


def check_environment(s: envscan.EnvScan, plan: ModelPlan, *, force: bool, target_platform: str | None,
                      progress: Progress | None, env_fp: dict[str, Any] | None = None,
                      backend: str = "torch") -> tuple[list[str], list[str]]:
    """Every check that can refuse the environment (``s``: as it will be shipped; ``env_fp``: the shipped
    set's fingerprint, judged for ``backend``); returns (warnings, forced refusals)."""
    from kit.env import Fingerprint, diff

    envscan.raise_problems(envscan.check_kit(s) + envscan.check_history(s) + envscan.check_editable(s)
                           + envscan.check_platform(s, target_platform), s.prefix)
    clobbered = envscan.check_conda_files(s)
    if clobbered and not force:
        envscan.raise_problems(clobbered, s.prefix, forcible=True)
    warnings: list[str] = []
    forced = [p.message for p in clobbered]
    assert s.fingerprint is not None  # check_kit
    fp = Fingerprint.from_dict(s.fingerprint if env_fp is None else env_fp)
    for mv in plan.mvs:
        report = diff(Fingerprint.from_dict(mv.env), fp, backend=backend)
        warnings += [f"{mv.ref}: {d.message}" for d in report.warnings]
        if report.errors:
            msg = (f"{mv.ref} was captured in an environment this one is incompatible with: "
                   f"{'; '.join(d.message for d in report.errors)}")
            if not force:
                raise PackError(f"{msg}. The server would refuse to load it. Pack from the environment the "
                                "model was captured in, re-capture the model here, or force the pack "
                                "(recorded in its manifest).", remedy="force")
            forced.append(msg)
    for w in warnings:
        say(progress, f"warning: {w}")
    for f_ in forced:
        say(progress, f"forced: {f_}")
    return warnings, forced


def copy_tree(src: Path, dest: Path, skip: Callable[[Path], bool] = lambda p: False) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES and not skip(Path(dirpath) / d))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.endswith((".pyc", ".pyo")) or fn in SKIP_NAMES or skip(p):
                continue
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


def stage_models(plan: ModelPlan, dest: Path) -> None:
    """The plan's model as a folder registry under ``dest``: the aliases.json and move records exactly as
    :func:`plan_models` read and verified them (not read again: a move made since is not in this archive,
    which ships what its aliases name), the audit events, and the folders of the planned versions as it
    verified them (from a bucket: this host's copy, whose files are links into the local verified cache)."""
    reg, model = plan.registry, plan.model
    for v in plan.versions:
        reg.gate_results(model, v)  # a bucket's gate runs brought into this host's copy (a folder's: a read)
    reg.history(model)  # ... and its event objects into its events.jsonl
    src = reg.root / model
    out = dest / model
    out.mkdir(parents=True)
    moves = plan.moves if plan.moves is not None else MoveSnapshot(reg.movelog(model).storage)
    if moves.pointer_bytes is not None:
        (out / "aliases.json").write_bytes(moves.pointer_bytes)
    for serial in moves.serials():
        (out / "moves").mkdir(exist_ok=True)
        (out / "moves" / moves.path(serial).name).write_bytes(moves.records[serial])
    if (src / "events.jsonl").is_file():
        shutil.copy2(src / "events.jsonl", out / "events.jsonl")
    for v in plan.versions:
        copy_tree(src / "versions" / str(v), out / "versions" / str(v),  # no hidden name is part of a version
                  skip=lambda p: p.name.startswith("."))


def git_source(path: Path) -> dict[str, Any]:
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


def stage_files(stage: Path, svc: ServiceInfo, plan: ModelPlan, s: envscan.EnvScan, *,
                bind: str, warnings: list[str]) -> tuple[dict[str, Any], str | None]:
    """Copy the service and models into ``stage``, render run.sh and the systemd unit (checked when
    systemd-analyze is here). Returns (the template context, the unit check's output or None)."""
    from kit.servicegen import app_target  # here, not at the top: run.sh's `kit.pack verify` needs no jinja2

    copy_tree(svc.directory, stage / "service")
    stage_models(plan, stage / "registry")
    ctx = dict(service=svc.name, label=plan.label, kit_version=kit_version, kind=s.kind,
               app=app_target(stage / "service"),  # app:app, or wsgi:app for a folder an older Kit generated
               created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               python=s.python, platform=s.platform, base_interpreter=s.base_interpreter,
               unit=f"kit-{svc.name}.service", bind=bind)
    (stage / "run.sh").write_text(_render("run.sh.j2", **ctx))
    (stage / "run.sh").chmod(0o755)
    unit_text = _render("unit.service.j2", **ctx)
    (stage / f"{svc.name}.service.in").write_text(unit_text)
    unit_check = check_unit(unit_text, stage)
    if unit_check is None:
        warnings.append("systemd-analyze is not installed here; the systemd unit was not verified")
    return ctx, unit_check


def manifest(*, svc: ServiceInfo, plan: ModelPlan, s: envscan.EnvScan, stem: str, created: str,
             files: dict[str, str], wheel_rel: str | None, warnings: list[str], forced: list[str],
             unit_check: str | None, signed_by: str | None, selection: dict[str, Any] | None = None,
             env: dict[str, Any] | None = None) -> dict[str, Any]:
    """kit-pack.json: what the archive holds and where it came from. ``env`` is the fingerprint of what was
    shipped (run.sh compares the unpacked environment with it); ``selection`` what was left out and why."""
    kit_dist = s.dist("kit")
    assert kit_dist is not None  # check_kit
    a = plan.aliases
    return {
        "format": "kit-pack", "schema": FORMAT_VERSION, "service": svc.name, "label": plan.label,
        "root": stem, "kind": s.kind, "platform": s.platform, "python": s.python,
        "base_interpreter": s.base_interpreter, "created": created,
        "kit": {"version": kit_version, "wheel": wheel_rel,
                "source": git_source(Path(kit_dist.editable_source)) if kit_dist.editable_source else {}},
        "models": {svc.model: {"production": a.production, "canary": a.canary,
                               "canary_weight": a.canary_weight, "versions": plan.versions,
                               "artifact_sha256": {str(mv.version): mv.artifact_sha256 for mv in plan.mvs}}},
        "files": files, "env": s.fingerprint if env is None else env, "warnings": warnings, "forced": forced,
        "selection": selection,
        "packed_on": {"host": socket.gethostname(), "prefix": str(s.prefix)},
        "systemd_analyze": unit_check, "signed_by": signed_by,
    }
