"""kit as a built wheel: an editable kit points at the checkout, which a server lacks."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kit.errors import PackError
from kit.pack._common import SKIP_NAMES, Progress, say


def _source_files(src: Path) -> Iterator[Path]:
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (src / name).is_file():
            yield src / name
    for pat in ("README*", "LICENSE*"):
        yield from sorted(p for p in src.glob(pat) if p.is_file())
    for dirpath, dirnames, filenames in os.walk(src / "kit"):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        for fn in sorted(filenames):
            if not fn.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / fn


def build_kit_wheel(source: Path, out_dir: Path, progress: Progress | None = None) -> Path:
    """Build kit's wheel from a copy of ``source`` (the checkout is never written to)."""
    source = Path(source)
    if not (source / "pyproject.toml").is_file() or not (source / "kit").is_dir():
        raise PackError(f"kit's source folder {source} (from its editable install) has no pyproject.toml "
                        "and kit/; reinstall kit with `pip install -e <checkout>` or install a kit wheel.")
    say(progress, f"building kit's wheel from {source}")
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


def source_key(source: Path) -> str:
    """sha256 over kit's source files (names and bytes) and this Python: what the wheel is built from."""
    h = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    for p in _source_files(Path(source)):
        h.update(f"{p.relative_to(source)}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cached_kit_install(source: Path, wheels_dir: Path, install_dir: Path, cache_dir: Path | None,
                       progress: Progress | None = None) -> Path:
    """Build kit's wheel and install it into ``install_dir`` (a site-packages layout), reusing the ones a
    pack of the same source made (``cache_dir/kit-<key>/``): two pip runs saved. Returns the wheel in
    ``wheels_dir``."""
    cached = None if cache_dir is None else Path(cache_dir) / f"kit-{source_key(source)[:32]}"
    if cached is not None and (cached / "done").is_file():
        (wheel,) = sorted(cached.glob("kit-*.whl"))
        say(progress, f"kit's source unchanged since an earlier pack: reusing {wheel.name} from {cached}")
        wheels_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, wheels_dir / wheel.name)
        shutil.copytree(cached / "install", install_dir, symlinks=True)
        return wheels_dir / wheel.name
    wheel = build_kit_wheel(source, wheels_dir, progress)
    install_wheel(wheel, install_dir)
    if cached is not None:
        part = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        shutil.copy2(wheel, part / wheel.name)
        shutil.copytree(install_dir, part / "install", symlinks=True)
        (part / "done").write_text("")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(part, cached)
        for old in sorted(cached.parent.glob("kit-*"), key=lambda q: q.stat().st_mtime)[:-3]:
            shutil.rmtree(old, ignore_errors=True)
    return wheel
