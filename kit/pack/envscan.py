"""What kind of environment is about to be packed, and whether it can be packed at all.

Every check here reads files; none changes the environment. Each problem is reported with the
package it concerns and the command that fixes it.

- :func:`probe` asks the environment's own interpreter where it keeps things (and for its fingerprint).
- :func:`scan` reads ``site-packages`` (dist-info, RECORD, WHEEL, direct_url.json, ``.pth``, ``.egg-link``)
  and ``conda-meta/`` into an :class:`EnvScan`.
- :func:`check_*` turn a scan into :class:`Problem` lists: editable installs, conda files deleted or
  overwritten by pip, a missing ``conda-meta/history``, platform mismatches.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kit.errors import PackError

log = logging.getLogger(__name__)

EnvKind = Literal["conda", "venv"]

# Run inside the environment being packed: where it keeps things, and its fingerprint when kit imports.
_PROBE = r"""
import json, platform, sys, sysconfig
out = {
    "python": platform.python_version(),
    "implementation": platform.python_implementation(),
    "platform": f"{sys.platform}-{platform.machine()}",
    "prefix": sys.prefix,
    "base_prefix": sys.base_prefix,
    "base_executable": getattr(sys, "_base_executable", sys.executable),
    "purelib": sysconfig.get_paths()["purelib"],
    "platlib": sysconfig.get_paths()["platlib"],
    "abi": "cp%d%d" % sys.version_info[:2],
}
try:
    import kit, kit.env
    out["kit_file"] = kit.__file__
    out["fingerprint"] = kit.env.fingerprint(None).to_dict()
except Exception as exc:  # reported by the caller with the fix
    out["kit_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""

_CONDA_SUBDIR = {
    "linux-x86_64": "linux-64",
    "linux-aarch64": "linux-aarch64",
    "linux-ppc64le": "linux-ppc64le",
    "darwin-x86_64": "osx-64",
    "darwin-arm64": "osx-arm64",
    "win32-AMD64": "win-64",
}


@dataclass(frozen=True)
class Problem:
    """One reason the environment cannot be packed as it is."""

    check: str  # "editable" | "clobbered" | "history" | "platform" | "fingerprint" | "kit"
    message: str


@dataclass(frozen=True)
class Dist:
    """One installed Python distribution, as its metadata folder describes it."""

    name: str  # normalised
    version: str
    meta_dir: str  # relative to the prefix
    installer: str
    editable_source: str | None = None  # a path outside the environment, for editable installs
    record: tuple[str, ...] = ()  # files relative to the prefix (from RECORD)
    wheel_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CondaRecord:
    name: str
    version: str
    build: str
    subdir: str
    meta_file: str
    files: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)  # files without a prefix placeholder


@dataclass(frozen=True)
class EnvScan:
    """An environment as read from disk (plus what its interpreter said about itself)."""

    prefix: Path
    kind: EnvKind
    python: str  # e.g. 3.11.7
    abi: str  # e.g. cp311
    platform: str  # e.g. linux-x86_64
    site_packages: str  # relative to the prefix
    base_interpreter: str | None  # venv only: the interpreter the venv needs at the same path
    fingerprint: dict[str, Any] | None
    kit_error: str | None
    dists: tuple[Dist, ...]
    conda_records: tuple[CondaRecord, ...]
    path_entries: tuple[tuple[str, str], ...]  # (.pth file, directory outside the env it adds)

    def dist(self, name: str) -> Dist | None:
        n = _norm(name)
        return next((d for d in self.dists if d.name == n), None)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_python(prefix: Path) -> Path:
    """The environment's interpreter (``bin/python``; ``python.exe`` on Windows)."""
    for cand in (prefix / "bin" / "python", prefix / "bin" / "python3", prefix / "python.exe"):
        if cand.exists():
            return cand
    raise PackError(
        f"No Python interpreter in {prefix} (looked for bin/python, bin/python3). "
        "Pack from a conda environment or venv instead (name its folder), or create one with `make env`."
    )


def detect_kind(prefix: Path) -> EnvKind:
    if (prefix / "conda-meta").is_dir():
        return "conda"
    if (prefix / "pyvenv.cfg").is_file():
        return "venv"
    raise PackError(
        f"{prefix} is neither a conda environment (no conda-meta/) nor a venv (no pyvenv.cfg). "
        "kit pack ships a whole environment: create it with `make env` and pack from inside it."
    )


def probe(prefix: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Ask the environment's interpreter about itself (a subprocess: the env need not be this one)."""
    py = env_python(prefix)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        out = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                             env=env, cwd=str(prefix), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackError(f"Could not run {py} to inspect the environment ({exc}).") from exc
    if out.returncode != 0:
        raise PackError(f"{py} failed while inspecting the environment: {out.stderr.strip()[-800:]}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise PackError(f"{py} printed no environment description ({out.stdout[-300:]!r}).") from exc


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _meta_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if not line.strip():
            break  # headers end at the first blank line
        if line.lower().startswith(key.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _record_paths(record: Path, site: Path, prefix: Path) -> tuple[str, ...]:
    out = []
    for line in _read_text(record).splitlines():
        if not line.strip():
            continue
        rel = line.rsplit(",", 2)[0] if line.count(",") >= 2 else line.split(",")[0]
        p = os.path.normpath(os.path.join(site, rel))
        try:
            out.append(os.path.relpath(p, prefix))
        except ValueError:
            continue
    return tuple(out)


def _editable_source(meta: Path) -> str | None:
    du = meta / "direct_url.json"
    if not du.is_file():
        return None
    try:
        d = json.loads(_read_text(du))
    except ValueError:
        return None
    if isinstance(d, dict) and d.get("dir_info", {}).get("editable") is True:
        url = str(d.get("url", ""))
        return url[len("file://"):] if url.startswith("file://") else url
    return None


def _scan_dists(prefix: Path, site: Path) -> list[Dist]:
    dists: list[Dist] = []
    if not site.is_dir():
        return dists
    for meta in sorted(site.iterdir()):
        if meta.suffix not in (".dist-info", ".egg-info"):
            continue
        mfile = meta / ("METADATA" if meta.suffix == ".dist-info" else "PKG-INFO")
        text = _read_text(mfile) if meta.is_dir() else _read_text(meta)
        name = _meta_field(text, "Name") or meta.name.split("-")[0]
        version = _meta_field(text, "Version") or "?"
        installer = _read_text(meta / "INSTALLER").strip() if meta.is_dir() else ""
        record: tuple[str, ...] = ()
        tags: tuple[str, ...] = ()
        if meta.is_dir() and (meta / "RECORD").is_file():
            record = _record_paths(meta / "RECORD", site, prefix)
        if meta.is_dir() and (meta / "WHEEL").is_file():
            tags = tuple(
                line.split(":", 1)[1].strip()
                for line in _read_text(meta / "WHEEL").splitlines()
                if line.startswith("Tag:")
            )
        dists.append(Dist(
            name=_norm(name), version=version, meta_dir=os.path.relpath(meta, prefix), installer=installer,
            editable_source=_editable_source(meta) if meta.is_dir() else None, record=record, wheel_tags=tags,
        ))
    # Legacy editable installs (`setup.py develop`): an .egg-link naming the source folder.
    for link in sorted(site.glob("*.egg-link")):
        src = _read_text(link).splitlines()[0].strip() if _read_text(link) else "?"
        dists.append(Dist(name=_norm(link.stem), version="?", meta_dir=os.path.relpath(link, prefix),
                          installer="egg-link", editable_source=src))
    return dists


def _scan_pth(prefix: Path, site: Path) -> list[tuple[str, str]]:
    """Directories outside the environment that ``.pth`` files put on sys.path (conda develop, hacks)."""
    found = []
    real_prefix = os.path.realpath(prefix)
    for pth in sorted(site.glob("*.pth")):
        for line in _read_text(pth).splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "import ")) or not os.path.isabs(line):
                continue
            real = os.path.realpath(line)
            if os.path.isdir(real) and not (real + os.sep).startswith(real_prefix + os.sep):
                found.append((pth.name, line))
    return found


def _scan_conda(prefix: Path) -> list[CondaRecord]:
    recs = []
    meta = prefix / "conda-meta"
    for j in sorted(meta.glob("*.json")):
        try:
            info = json.loads(_read_text(j))
        except ValueError as exc:
            raise PackError(
                f"{j} is not valid JSON ({exc}); the conda environment is damaged. Recreate it with `make env`."
            ) from exc
        sizes: dict[str, int] = {}
        for p in (info.get("paths_data") or {}).get("paths", []):
            if p.get("prefix_placeholder") or p.get("path_type", "hardlink") != "hardlink":
                continue  # placeholders are rewritten at install, so the size legitimately differs
            if isinstance(p.get("size_in_bytes"), int):
                sizes[os.path.normpath(p["_path"])] = p["size_in_bytes"]
        recs.append(CondaRecord(
            name=str(info.get("name", j.stem)), version=str(info.get("version", "?")),
            build=str(info.get("build", "")), subdir=str(info.get("subdir", "")),
            meta_file=os.path.relpath(j, prefix),
            files=tuple(os.path.normpath(f) for f in info.get("files", []) if f != ".nonadmin"), sizes=sizes,
        ))
    return recs


def _venv_base(prefix: Path) -> str | None:
    cfg = _read_text(prefix / "pyvenv.cfg")
    values = {}
    for line in cfg.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            values[k.strip().lower()] = v.strip()
    return values.get("executable") or values.get("home")


def scan(prefix: Path, *, info: dict[str, Any] | None = None) -> EnvScan:
    """Read the environment at ``prefix`` (``info`` is :func:`probe`'s answer; probed when None)."""
    prefix = Path(prefix).absolute()
    if not prefix.is_dir():
        raise PackError(f"Environment folder {prefix} does not exist. Create it with `make env`.")
    kind = detect_kind(prefix)
    info = probe(prefix) if info is None else info
    site_abs = Path(info["purelib"])
    try:
        site_rel = os.path.relpath(site_abs, info["prefix"])
    except ValueError:
        site_rel = f"lib/python{'.'.join(info['python'].split('.')[:2])}/site-packages"
    site = prefix / site_rel
    base = None
    if kind == "venv":
        base = _venv_base(prefix) or info.get("base_executable")
    return EnvScan(
        prefix=prefix, kind=kind, python=info["python"], abi=info["abi"], platform=info["platform"],
        site_packages=site_rel, base_interpreter=base, fingerprint=info.get("fingerprint"),
        kit_error=info.get("kit_error"), dists=tuple(_scan_dists(prefix, site)),
        conda_records=tuple(_scan_conda(prefix)) if kind == "conda" else (),
        path_entries=tuple(_scan_pth(prefix, site)),
    )


# --------------------------------------------------------------------------- checks


def check_kit(s: EnvScan) -> list[Problem]:
    if s.dist("kit") is None or s.fingerprint is None:
        why = s.kit_error or "no kit distribution in site-packages"
        return [Problem("kit", (
            f"kit is not importable in the environment {s.prefix} ({why}); the service imports kit.serving "
            f"at run time. Install it there: `{s.prefix}/bin/python -m pip install -e <kit checkout>` "
            "(kit pack replaces an editable kit with a built wheel)."
        ))]
    return []


def check_editable(s: EnvScan, *, replaceable: frozenset[str] = frozenset({"kit"})) -> list[Problem]:
    """Editable installs other than those kit replaces with a wheel (``replaceable``) cannot be packed."""
    out = []
    for d in s.dists:
        if d.editable_source and d.name not in replaceable:
            out.append(Problem("editable", (
                f"{d.name} {d.version} is an editable install from {d.editable_source}; the archive would "
                "point back at that folder, which the server does not have. Install it as a package instead: "
                f"`{s.prefix}/bin/python -m pip install --no-deps {d.editable_source}` (without -e), "
                "or uninstall it if the service does not need it."
            )))
    for pth, path in s.path_entries:
        owner = next((d for d in s.dists if d.editable_source and d.name in replaceable
                      and os.path.realpath(path) == os.path.realpath(d.editable_source)), None)
        if owner is not None:
            continue
        out.append(Problem("editable", (
            f"{s.site_packages}/{pth} adds {path} (outside the environment) to sys.path, like an editable "
            f"install; the server will not have that folder. Remove {pth} and install that code as a package."
        )))
    return out


def check_conda_files(s: EnvScan) -> list[Problem]:
    """conda-managed files that are missing, or were overwritten by pip (it names both packages)."""
    if s.kind != "conda":
        return []
    out = []
    owner: dict[str, CondaRecord] = {}
    conda_meta_dirs: set[str] = set()
    for r in s.conda_records:
        for f in r.files:
            owner[f] = r
            if f.endswith((".dist-info/RECORD", ".egg-info/PKG-INFO")):
                conda_meta_dirs.add(os.path.dirname(f))
    missing: dict[str, list[str]] = {}
    resized: dict[str, list[str]] = {}
    for r in s.conda_records:
        for f in r.files:
            p = s.prefix / f
            if not os.path.lexists(p):
                missing.setdefault(f"{r.name} {r.version}", []).append(f)
            elif f in r.sizes and p.is_file() and not p.is_symlink() and p.stat().st_size != r.sizes[f]:
                resized.setdefault(f"{r.name} {r.version}", []).append(f)
    clobbered: dict[tuple[str, str], list[str]] = {}
    for d in s.dists:
        if d.meta_dir in conda_meta_dirs or d.installer == "conda":
            continue
        for f in d.record:
            rec = owner.get(os.path.normpath(f))
            if rec is not None and _norm(rec.name) != d.name:
                clobbered.setdefault((f"{d.name} {d.version}", f"{rec.name} {rec.version}"), []).append(f)
    for (pip_pkg, conda_pkg), files in sorted(clobbered.items()):
        out.append(Problem("clobbered", (
            f"pip package {pip_pkg} overwrote files of conda package {conda_pkg} ({_few(files)}). "
            f"Fix the environment: `pip uninstall {pip_pkg.split()[0]}` and install it with conda, or "
            f"`conda install --force-reinstall {conda_pkg.split()[0]}`; or force the pack to ship it anyway."
        )))
    for pkg, files in sorted(missing.items()):
        out.append(Problem("clobbered", (
            f"files of conda package {pkg} are missing ({_few(files)}), usually deleted by `pip uninstall` "
            f"or pip replacing it. Run `conda install --force-reinstall {pkg.split()[0]}`; or force the pack."
        )))
    for pkg, files in sorted(resized.items()):
        out.append(Problem("clobbered", (
            f"files of conda package {pkg} were changed after conda installed them ({_few(files)}; size "
            f"differs from conda-meta). Run `conda install --force-reinstall {pkg.split()[0]}`; or force the pack."
        )))
    return out


def check_history(s: EnvScan) -> list[Problem]:
    if s.kind == "conda" and not (s.prefix / "conda-meta" / "history").is_file():
        return [Problem("history", (
            f"{s.prefix}/conda-meta/history is missing; conda-pack needs it (it dates the archive). "
            f"Create it with `touch {s.prefix}/conda-meta/history` (an empty file is enough), "
            "or recreate the environment with `make env`."
        ))]
    return []


def _tag_platform_ok(tag: str, platform: str, abi: str) -> bool:
    parts = tag.split("-")
    if len(parts) != 3:
        return True
    py, tag_abi, plat = parts
    if plat != "any":
        os_name, _, machine = platform.partition("-")
        ok_os = {"linux": ("linux_", "manylinux", "musllinux"), "darwin": ("macosx",), "win32": ("win",)}
        if not plat.startswith(ok_os.get(os_name, (os_name,))):
            return False
        arch = {"AMD64": "amd64"}.get(machine, machine)
        if not (plat.endswith(arch) or plat.endswith("universal2")):
            return False
    if tag_abi.startswith("cp") and tag_abi not in (abi, "abi3") and not tag_abi.startswith(abi):
        return False
    if py.startswith("cp") and tag_abi not in ("abi3", "none") and py != abi:
        return False
    return True


def check_platform(s: EnvScan, target: str | None = None) -> list[Problem]:
    """The environment, its wheels and its conda packages are all for one platform (``target``)."""
    out = []
    if target and target != s.platform:
        out.append(Problem("platform", (
            f"the environment is {s.platform} but the target platform is {target}. An environment only runs "
            f"on the platform it was built for: create it on (or for) {target} and pack there."
        )))
    bad = [f"{d.name} {d.version} ({', '.join(d.wheel_tags)})" for d in s.dists
           if d.wheel_tags and not any(_tag_platform_ok(t, s.platform, s.abi) for t in d.wheel_tags)]
    if bad:
        out.append(Problem("platform", (
            f"wheels built for another platform or Python than this {s.platform} Python {s.python} environment: "
            f"{_few(bad)}. Reinstall them here: `{s.prefix}/bin/python -m pip install --force-reinstall "
            f"{' '.join(b.split()[0] for b in bad[:5])}`."
        )))
    subdir = _CONDA_SUBDIR.get(s.platform)
    wrong = [f"{r.name} {r.version} ({r.subdir})" for r in s.conda_records
             if r.subdir and subdir and r.subdir not in (subdir, "noarch")]
    if wrong:
        out.append(Problem("platform", (
            f"conda packages for another platform than {subdir}: {_few(wrong)}. Recreate the environment "
            "on this platform with `make env`."
        )))
    return out


def _few(items: list[str], n: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def raise_problems(problems: list[Problem], where: Path, *, forcible: bool = False) -> None:
    """One PackError listing every problem; ``forcible`` ones name forcing as the way past them."""
    if problems:
        body = "\n".join(f"  - [{p.check}] {p.message}" for p in problems)
        raise PackError(f"Cannot pack the environment {where}:\n{body}", remedy="force" if forcible else None)


def running_prefix() -> Path:
    """The environment this process runs in."""
    return Path(sys.prefix)
