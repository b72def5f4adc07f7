"""The environment layer: the environment as its own gzip member (or zstd frame), cached by a stat of every
shipped file.

Written with conda-pack for a conda environment, else file by file (the venv fallback). The cache key
covers every path, mode, size, mtime and link target plus the archive root, so packing again with an
unchanged environment reuses the member (even after kit itself changed: kit goes in a second member).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from kit.errors import PackError
from kit.pack import envscan, integrity
from kit.pack._common import FORMAT_VERSION, Progress, human, say
from kit.pack._tar import TarMember

_KEEP_LAYERS = 3


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
               compresslevel: int, codec: str = "gzip") -> tuple[str, int, dict[str, int]]:
    # The key is what the layer holds: every shipped path's stat (a folder's mode only: installing a package
    # the service does not ship touches site-packages' mtime, not the layer), so unrelated installs and the
    # left-out set's other members do not invalidate it. conda-pack's list also depends on the left-out set.
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, str(s.prefix), s.kind, arc_env, compresslevel, codec,
                         sorted(exclude) if s.kind == "conda" else [], sorted(kit_files.items()),
                         _conda_pack_version()]).encode())
    total = 0
    sizes: dict[str, int] = {}
    for rel, st in _walk(s.prefix, exclude):
        link = os.readlink(s.prefix / rel) if os.path.islink(s.prefix / rel) else ""
        if stat.S_ISDIR(st.st_mode):
            h.update(f"{rel}\0{st.st_mode}\n".encode("utf-8", "surrogateescape"))
            continue
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
            say(self.progress, f"{self.what}: {min(pct, 100)}% ({human(self.done)} of {human(self.total)}, "
                                f"{human(rate)}/s)")


def _write_venv_layer(member: TarMember, s: envscan.EnvScan, exclude: set[str], arc_env: str) -> None:
    for rel, _st in _walk(s.prefix, exclude):
        member.add_path(s.prefix / rel, f"{arc_env}/{rel}")


def _excluded(rel: str, exclude: set[str]) -> bool:
    """``rel`` or a folder above it is excluded."""
    while rel and rel != ".":
        if rel in exclude:
            return True
        rel = os.path.dirname(rel)
    return False


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
        # what the service does not need (kit.pack.select) and the editable kit: a set, not conda-pack's
        # exclude(pattern), which would fnmatch every file against each of tens of thousands of paths
        kept = [f for f in env.files if not _excluded(os.path.normpath(f.target), exclude)]
        dropped = [f for f in env.files if _excluded(os.path.normpath(f.target), exclude)]
        env = CondaEnv(env.prefix, kept, excluded_files=list(env._excluded_files) + dropped)
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


def env_layer(s: envscan.EnvScan, arc_env: str, exclude: set[str], compresslevel: int, cache_dir: Path | None, force: bool, tmp: Path,
               progress: Progress | None, codec: str = "gzip") -> tuple[Path, bool, int, tuple[dict[str, str], dict[str, str]]]:
    """Write (or reuse) the environment's compressed member; returns (file, reused, env bytes, (file sha256s,
    links)). The cache key covers every shipped path's stat and what was left out (``exclude``)."""
    # kit's own files go into the second member (see pack), so editing kit does not invalidate this layer.
    key, total, _sizes = _layer_key(s, exclude, {}, arc_env, compresslevel, codec)
    ext = ".zst" if codec == "zstd" else ".gz"
    if cache_dir is not None:
        cached = cache_dir / f"env-{key[:32]}{ext}"
        digests = integrity.read_layer_digests(cached)
        if cached.is_file() and digests is not None:
            os.utime(cached)
            say(progress, f"environment unchanged since an earlier pack: reusing {cached}")
            return cached, True, total, digests
    out = (cache_dir or tmp) / f".env-{key[:32]}{ext}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    verb = "conda-pack" if s.kind == "conda" else "packing the venv"
    say(progress, f"{verb}: {s.prefix} ({human(total)} in files) -> {arc_env}/")
    meter = _Meter(total, progress, verb)
    try:
        with open(out, "wb") as f:
            member = TarMember(f, compresslevel, on_bytes=meter, codec=codec)
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
    final = cache_dir / f"env-{key[:32]}{ext}"
    integrity.write_layer_digests(final, *digests)  # first: a layer without its digests is never reused
    os.replace(out, final)
    layers = [p for p in cache_dir.glob("env-*") if p.suffix in (".gz", ".zst")]
    for old in sorted(layers, key=lambda p: p.stat().st_mtime, reverse=True)[_KEEP_LAYERS:]:
        old.unlink(missing_ok=True)
        integrity.digests_path(old).unlink(missing_ok=True)
    return final, False, total, digests


def largest(s: envscan.EnvScan, n: int = 4) -> str:
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
