"""Which distributions a serving archive ships: what the service runs, at the exact installed versions.

The shipped set is the closure of the serving runtime's requirements, read from the installed metadata
(``Requires-Dist``, markers evaluated, extras followed): kit's own requirements (without torch for an
``onnxruntime`` service, which ships ``onnxruntime`` instead; with kit's ``s3`` extra, obstore, for a service
whose registry is a bucket), plus ``include`` (a service's ``pack.toml`` or ``kit pack --include``), minus
``exclude``. Everything else is left out, each with its reason: Jupyter,
test and lint tools, browser drivers, torch under onnxruntime, ... The environment's own files that no
distribution owns (the interpreter, its standard library, ``pyvenv.cfg``) always go in.

A conda package is left out only when every Python distribution it installs is; packages without one
(shared libraries, the interpreter) always go in. Nothing here changes the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from kit.errors import PackError
from kit.pack import envscan
from kit.pack._common import human

PACK_FILE = "pack.toml"  # optional, in the service folder: [pack] include = [...], exclude = [...]
# Left out with this reason whenever nothing the service runs requires them (the report names them).
_DEV_TOOLS = {
    "jupyter": "Jupyter (notebook side)", "notebook": "Jupyter (notebook side)", "ipy": "IPython/Jupyter kernel",
    "nbconvert": "notebook tooling", "nbformat": "notebook tooling", "nbclient": "notebook tooling",
    "papermill": "validation gate (notebook side)", "pytest": "test tool", "hypothesis": "test tool",
    "schemathesis": "test tool", "mypy": "type checker", "ruff": "linter", "playwright": "browser driver",
    "py-rattler": "conda solver (tests)", "conda-pack": "packing tool", "build": "packaging tool",
    "pip": "installer", "torch": "not used by the onnxruntime backend", "nvidia-": "CUDA libraries of torch",
    "triton": "torch's GPU compiler", "onnx": "capture-time ONNX export", "onnxscript": "capture-time ONNX export",
    "scikit-learn": "notebook side (training)", "scipy": "notebook side (training)",
}

# Parts of a shipped distribution that nothing at run time reads (relative to site-packages); left out.
TRIM = {"torch": (("torch/include", "C++ headers (building extensions)"),
                  ("torch/test", "C++ test binaries"), ("torch/share", "CMake files"))}


@dataclass(frozen=True)
class PackSettings:
    """``pack.toml`` ``[pack]`` plus the command line: distributions added to, and removed from, the closure."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selection:
    """What goes in, what stays out and why, and the paths (relative to the prefix) that stay out."""

    backend: str
    shipped: dict[str, str]  # name -> version
    left_out: dict[str, str]  # name -> reason
    sizes: dict[str, int]  # name -> bytes installed (every distribution)
    modules: dict[str, tuple[str, ...]]  # left-out name -> the top-level modules it provides
    exclude_paths: frozenset[str] = field(default_factory=frozenset)
    trimmed: dict[str, int] = field(default_factory=dict)  # "torch/include (C++ headers ...)" -> bytes

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "shipped": dict(sorted(self.shipped.items())),
                "left_out": {n: {"reason": r, "modules": list(self.modules.get(n, ())), "bytes": self.sizes.get(n, 0)}
                             for n, r in sorted(self.left_out.items())},
                "trimmed": dict(sorted(self.trimmed.items()))}


def read_pack_settings(service_dir: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> PackSettings:
    """``<service_dir>/pack.toml`` (optional) merged with the command line's ``include``/``exclude``."""
    path = Path(service_dir) / PACK_FILE
    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PackError(f"{path} is not valid TOML ({exc}); fix it (it holds [pack] include/exclude).") from exc
    body = doc.get("pack", {})
    if set(doc) - {"pack"} or not isinstance(body, dict) or set(body) - {"include", "exclude"}:
        raise PackError(f"{path} may hold only [pack] with include = [...] and exclude = [...] (distribution "
                        f"names); found {sorted(doc)} / {sorted(body) if isinstance(body, dict) else body!r}.")
    out = {}
    for key, extra in (("include", include), ("exclude", exclude)):
        names = body.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise PackError(f"{path}: [pack] {key} must be a list of distribution names, got {names!r}.")
        out[key] = tuple(envscan._norm(n) for n in [*names, *extra])
    return PackSettings(**out)


def _requires(s: envscan.EnvScan, d: envscan.Dist) -> list[Requirement]:
    meta = s.prefix / d.meta_dir
    text = envscan._read_text(meta / "METADATA") if meta.is_dir() else envscan._read_text(meta)
    if meta.is_dir() and not text:
        text = envscan._read_text(meta / "PKG-INFO")
    out = []
    for line in text.split("\n\n", 1)[0].splitlines():
        if line.lower().startswith("requires-dist:"):
            try:
                out.append(Requirement(line.split(":", 1)[1].strip()))
            except InvalidRequirement:
                continue  # a malformed line in someone else's metadata: it requires nothing we can name
    return out


def closure(s: envscan.EnvScan, roots: list[Requirement]) -> dict[str, str]:
    """Every installed distribution the ``roots`` need (transitively): name -> what first required it."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(python_version=".".join(s.python.split(".")[:2]), python_full_version=s.python)
    need: dict[str, str] = {}
    extras: dict[str, set[str]] = {}
    todo = [(r, "the service") for r in roots]
    while todo:
        req, why = todo.pop()
        name = envscan._norm(req.name)
        d = s.dist(name)
        have = extras.get(name)
        new = set(req.extras) - (have or set())
        if d is None or (have is not None and not new):
            continue  # not installed (an optional dependency: nothing to ship), or already followed
        need.setdefault(name, why)
        extras[name] = (have or set()) | new
        for sub in _requires(s, d):
            base = have is None and (sub.marker is None or sub.marker.evaluate({**env, "extra": ""}))
            if base or (sub.marker is not None and any(sub.marker.evaluate({**env, "extra": e}) for e in new)):
                todo.append((sub, name))
    return need


def serving_roots(s: envscan.EnvScan, backend: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """kit's own runtime requirements for ``backend`` and kit's ``extras`` (onnxruntime instead of torch)."""
    kit_dist = s.dist("kit")
    if kit_dist is None:
        raise PackError(f"kit is not installed in {s.prefix}; nothing to serve with.")
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    base = [r for r in _requires(s, kit_dist)
            if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in ("", *extras))]
    if backend == "onnxruntime":
        ort = next((n for n in ("onnxruntime-gpu", "onnxruntime") if s.dist(n) is not None), None)
        if ort is None:
            raise PackError(f"the service's backend is onnxruntime, which is not installed in {s.prefix}. Install "
                            f"it there (`{s.prefix}/bin/python -m pip install onnxruntime`) or serve with torch.")
        base = [r for r in base if envscan._norm(r.name) != "torch"] + [Requirement(ort)]
    return base


def _reason(name: str, settings: PackSettings, backend: str) -> str:
    if name in settings.exclude:
        return "excluded by pack.toml / --exclude"
    if backend == "onnxruntime" and name == "torch":
        return "not used by the onnxruntime backend"
    for prefix, why in _DEV_TOOLS.items():
        if name == prefix or name.startswith(prefix if prefix.endswith("-") or prefix in ("jupyter", "ipy")
                                             else prefix + "-"):
            return f"{why}; not required by the service"
    return "not required by the service"


def owned_files(s: envscan.EnvScan) -> dict[str, set[str]]:
    """Distribution name -> its files relative to the prefix (RECORD; for conda, every file of the conda
    package that installs it)."""
    out: dict[str, set[str]] = {d.name: {*d.record, d.meta_dir} for d in s.dists}
    by_meta = {os.path.normpath(d.meta_dir): d.name for d in s.dists}
    for r in s.conda_records:
        names = {by_meta[os.path.dirname(f)] for f in r.files if os.path.dirname(f) in by_meta}
        for n in names:
            out[n].update(r.files)
            out[n].add(r.meta_file)
    return out


def _top_modules(s: envscan.EnvScan, files: set[str]) -> tuple[str, ...]:
    tops = set()
    under = os.path.normpath(s.site_packages) + os.sep
    for f in files:
        if not f.startswith(under):
            continue
        top = f[len(under):].split(os.sep, 1)[0]
        if top.endswith((".dist-info", ".egg-info", ".pth", ".data")) or top == "__pycache__":
            continue
        tops.add(top.split(".", 1)[0] if top.endswith((".py", ".so")) else top)
    return tuple(sorted(tops))


def select(s: envscan.EnvScan, backend: str, settings: PackSettings = PackSettings(),
           extras: tuple[str, ...] = ()) -> Selection:
    """The shipped set for a ``backend`` service and the paths that stay out (see the module docstring);
    ``extras``: kit's extras the service needs (``("s3",)`` when its registry is a bucket)."""
    missing = [n for n in settings.include if s.dist(n) is None]
    if missing:
        raise PackError(f"The shipped set's include (pack.toml or the pack call) names {', '.join(missing)}, not "
                        f"installed in {s.prefix}. Install it there or remove it from include.")
    roots = serving_roots(s, backend, extras) + [Requirement(n) for n in settings.include]
    need = closure(s, roots)  # kit itself is shipped (as its wheel) without following all it requires
    files = owned_files(s)
    sizes = {n: _size(s.prefix, fs) for n, fs in files.items()}
    shipped: dict[str, str] = {}
    left: dict[str, str] = {}
    for d in s.dists:
        if d.name == "kit" or (d.name in need and d.name not in settings.exclude):
            shipped[d.name] = d.version
        else:
            left[d.name] = _reason(d.name, settings, backend)
    drop: set[str] = set()
    for n in left:
        drop.update(files[n])
    keep = {os.path.normpath(f) for n in shipped for f in files[n]}
    drop -= keep  # a file two distributions claim (a shared folder in a RECORD) stays
    trimmed: dict[str, int] = {}
    for n, parts in TRIM.items():
        for part, why in parts if n in shipped else ():
            rel = os.path.normpath(os.path.join(s.site_packages, part))
            cut = {f for f in files[n] if f == rel or f.startswith(rel + os.sep)}
            if cut:
                drop.update(cut)
                trimmed[f"{part} ({why})"] = _size(s.prefix, cut)
    return Selection(backend=backend, shipped=shipped, left_out=left, sizes=sizes, trimmed=trimmed,
                     modules={n: _top_modules(s, files[n]) for n in left},
                     exclude_paths=frozenset(_prune(s.prefix, drop, os.path.normpath(s.site_packages), keep))
                     if drop else frozenset())


def _size(prefix: Path, rels: set[str]) -> int:
    total = 0
    base = str(prefix) + os.sep
    for rel in rels:
        try:
            st = os.lstat(base + rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _walk_roots(site: str, paths: set[str]) -> set[str]:
    """The folders to walk for ``paths``: their top-level package folder in site-packages (its
    ``__pycache__`` for a lone module), else their own folder; never the whole environment."""
    roots = set()
    under = site + os.sep
    for p in paths:  # plain string work: os.path.relpath makes both paths absolute, at every call
        if not p.startswith(under):
            roots.add(os.path.dirname(p))
        else:
            top = p[len(under):].split(os.sep, 1)
            roots.add(under + (top[0] if len(top) > 1 else "__pycache__"))
    return roots


def _prune(prefix: Path, drop: set[str], site: str, kept: set[str]) -> set[str]:
    """``drop`` plus the bytecode of dropped sources and every folder left with nothing in it: an empty
    ``torch/`` would still import (as a namespace package) instead of failing by name. A top-level package
    folder none of the ``kept`` files is under goes whole, unwalked."""
    out = {os.path.normpath(p) for p in drop}
    touched = {os.path.dirname(p) for p in out}
    kept_roots = _walk_roots(site, kept)
    for root in sorted(_walk_roots(site, out)):
        if os.path.islink(prefix / root) or not os.path.isdir(prefix / root):
            continue
        if root not in kept_roots and root.startswith(site + os.sep) and os.path.basename(root) != "__pycache__":
            out.add(root)  # a package folder of left-out distributions only: all of it, orphan bytecode included
            continue
        for dirpath, dirnames, filenames in os.walk(prefix / root, topdown=False):
            rel_dir = os.path.relpath(dirpath, prefix)
            for fn in filenames:
                rel = os.path.normpath(os.path.join(rel_dir, fn))
                if rel in out or not fn.endswith(".pyc") or os.path.basename(rel_dir) != "__pycache__":
                    continue
                src = os.path.join(os.path.dirname(rel_dir), fn.split(".", 1)[0] + ".py")
                if os.path.normpath(src) in out:
                    out.add(rel)
                    touched.add(rel_dir)
            entries = [os.path.normpath(os.path.join(rel_dir, e)) for e in (*dirnames, *filenames)]
            if rel_dir not in (".", site) and rel_dir in touched and all(e in out for e in entries):
                out.add(rel_dir)
                touched.add(os.path.dirname(rel_dir))
    return out


def shipped_scan(s: envscan.EnvScan, sel: Selection) -> envscan.EnvScan:
    """``s`` as the archive will hold it (what the pre-pack checks judge): the shipped distributions, the
    ``.pth`` files and conda packages that are not left out."""
    out = sel.exclude_paths
    return dataclasses.replace(
        s, dists=tuple(d for d in s.dists if d.name in sel.shipped),
        path_entries=tuple(e for e in s.path_entries if os.path.join(s.site_packages, e[0]) not in out),
        conda_records=tuple(r for r in s.conda_records if r.meta_file not in out))


def shipped_fingerprint(fp: dict[str, Any], sel: Selection) -> dict[str, Any]:
    """The environment's fingerprint as the archive will have it: the same interpreter and platform, only
    the shipped distributions (what ``run.sh`` compares with the unpacked environment, exactly)."""
    out = dict(fp)
    dists = {k: v for k, v in fp.get("distributions", {}).items() if envscan._norm(k) in sel.shipped}
    out["distributions"] = dists
    out["distributions_sha256"] = hashlib.sha256(json.dumps(dists, sort_keys=True).encode()).hexdigest()
    if "torch" not in sel.shipped:
        out["torch"] = out["cuda"] = None
    if not {"onnxruntime", "onnxruntime-gpu"} & set(sel.shipped):
        out["onnxruntime"] = None
    return out


def report(sel: Selection, top: int = 12) -> list[str]:
    """Size by package before and after, and what was left out and why (what ``kit pack`` prints)."""
    before = sum(sel.sizes.values())
    after = sum(sel.sizes.get(n, 0) for n in sel.shipped) - sum(sel.trimmed.values())
    lines = [f"packages ({sel.backend} backend): {len(sel.sizes)} installed, {human(before)} -> "
             f"{len(sel.shipped)} shipped, {human(after)}"]
    ranked = sorted(sel.sizes.items(), key=lambda kv: -kv[1])
    lines.append(f"  {'package':<28} {'installed':>10} {'shipped':>10}  why not")
    for name, size in ranked[:top]:
        shipped = human(size) if name in sel.shipped else "-"
        lines.append(f"  {name:<28} {human(size):>10} {shipped:>10}  {sel.left_out.get(name, '')}")
    rest = [n for n, _ in ranked[top:] if n in sel.left_out]
    if rest:
        by_reason: dict[str, list[str]] = {}
        for n in rest:
            by_reason.setdefault(sel.left_out[n], []).append(n)
        for why, names in sorted(by_reason.items()):
            size = sum(sel.sizes.get(n, 0) for n in names)
            lines.append(f"  also left out ({why}, {human(size)}): {', '.join(sorted(names))}")
    lines += [f"  trimmed: {part}, {human(size)}" for part, size in sel.trimmed.items()]
    return lines
