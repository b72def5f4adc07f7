"""The conda path for real: a conda-format prefix built offline with py-rattler, the real conda-pack,
the real conda-unpack, served by gunicorn from another directory after the source and the prefix are gone.

Two prefixes: a small one (python, flask, gunicorn, kit editable) serving a mini Flask app, and one with
kit's runtime and onnxruntime but no torch, kit installed from its wheel, packed and passing kit pack
--verify. The prefix with torch serving the real generated Kit service is tests/e2e/test_pack_conda_torch.py.

What this does NOT exercise (and why): conda-forge's own binaries (no conda channel is reachable here; the
prefix's python and packages are this machine's installed files repackaged, see
tests/fixtures/conda_env.py), and a second host.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from kit._proc import free_port, stop_group
from kit.errors import PackError
from kit.pack import pack
from kit.pack.verify import extract, start_unpacked, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import conda_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "tests" / "fixtures" / "pack" / "mini_service"


def copy_kit_source(dest: Path) -> Path:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "kit", dest / "kit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def install_editable(src: Path, prefix: Path, tools: Path) -> None:
    """kit as a researcher has it: `pip install -e` into the conda environment, by that environment's python.

    pip and setuptools are borrowed on PYTHONPATH from a copy; running this interpreter's pip with
    --prefix instead would uninstall kit from *this* environment first (pip treats it as the same install).
    """
    site = Path(sysconfig.get_paths()["purelib"])
    for mod in ("pip", "setuptools", "_distutils_hack"):
        spec = importlib.util.find_spec(mod)  # found, not imported (setuptools warns about distutils)
        assert spec is not None and spec.origin, f"{mod} is needed to install kit editable into the test prefix"
        shutil.copytree(Path(spec.origin).parent, tools / mod, ignore=shutil.ignore_patterns("__pycache__"))
    for meta in site.glob("setuptools-*.dist-info"):  # its entry points register the build commands
        shutil.copytree(meta, tools / meta.name)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tools), "PYTHONNOUSERSITE": "1"}
    subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-e", str(src)],
                   check=True, capture_output=True, text=True, cwd=src, env=env)


@pytest.fixture
def conda_setup(tmp_path, registered, repo_root):
    cache = repo_root / ".cache"
    cache.mkdir(exist_ok=True)
    t = time.monotonic()
    channel = conda_env.channel(cache)
    prefix = conda_env.create_prefix(channel, tmp_path / "envs" / "kitenv", cache / "conda-pkgs")
    src = tmp_path / "src"
    src.mkdir()
    copy_kit_source(src)
    ours = sorted(Path(sysconfig.get_paths()["purelib"]).glob("__editable__*kit*"))
    (tmp_path / "tools").mkdir()
    install_editable(src, prefix, tmp_path / "tools")
    assert ours and all(p.exists() for p in ours)  # this environment's editable kit is untouched
    registry, mv = registered
    registry.promote(mv.name, mv.version, force=True, why="test")  # gates are the gate area's; forced here
    svc = tmp_path / "services" / "mini"
    shutil.copytree(MINI, svc)
    toml = svc / "service.toml"
    toml.write_text(toml.read_text().replace("REGISTRY", str(registry.root)))
    print(f"conda prefix ready in {time.monotonic() - t:.1f}s")
    return prefix, src, registry, mv, svc


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_conda_prefix_packs_unpacks_relocates_and_serves_without_source(conda_setup, tmp_path):
    prefix, src, registry, mv, svc = conda_setup
    # The kit in the prefix is editable, pointing at the source copy; conda-pack alone would refuse it.
    site = prefix / "lib" / f"python{conda_env.PY_VER}" / "site-packages"
    assert list(site.glob("__editable__*kit*.pth"))

    # The model was captured with torch; this prefix has none: refused unless forced.
    with pytest.raises(PackError, match=r"torch .*force the pack"):
        pack(svc, out_dir=tmp_path / "dist", env_prefix=prefix, cache_dir=None)

    lines: list[str] = []
    res = pack(svc, out_dir=tmp_path / "dist", env_prefix=prefix, force=True, progress=lines.append,
               cache_dir=tmp_path / "layers")
    print(f"conda archive {res.size_bytes / 1e6:.1f} MB in {res.seconds:.1f}s {res.timings}")
    assert res.kind == "conda" and res.models == {"demo-digits": [1]}
    assert res.forced and any("torch" in f for f in res.forced)
    assert any(line.startswith("conda-pack:") for line in lines) and any("size report" in x for x in lines)

    # Nothing may lead back: delete the source copy and the original prefix, move the archive.
    shutil.rmtree(src)
    shutil.rmtree(prefix)
    elsewhere = tmp_path / "server"
    elsewhere.mkdir()
    archive = elsewhere / res.archive.name
    shutil.move(str(res.archive), archive)
    t = time.monotonic()
    root = extract(archive, elsewhere / "opt")
    print(f"extracted in {time.monotonic() - t:.1f}s")
    env_dir = root / "env"
    assert (env_dir / "bin" / "conda-unpack").is_file()
    assert not list((env_dir / "lib").glob("python*/site-packages/__editable__*"))

    # A carrier's archive holding a record of a relocation (env/.kit-unpacked*) that lists an edited
    # conda-unpack: refused before conda-unpack runs (run.sh used to check env/ against it and run the script).
    state = tmp_path / "state"  # run.sh's KIT_STATE_DIR: where it keeps the key of its record
    clean = {"PATH": os.environ["PATH"], "KIT_STATE_DIR": str(state)}
    planted = extract(archive, elsewhere / "planted")
    pwned = tmp_path / "pwned"
    script = planted / "env" / "bin" / "conda-unpack"
    script.write_text(script.read_text() + f"\nopen({str(pwned)!r}, 'w').close()\n")
    sums = [ln for ln in (planted / "kit-pack.sha256").read_text().splitlines() if ln[66:70] == "env/"]
    edited = f"{hashlib.sha256(script.read_bytes()).hexdigest()}  env/bin/conda-unpack"
    (planted / "env" / ".kit-unpacked.sha256").write_text(
        "".join((edited if ln.endswith("  env/bin/conda-unpack") else ln) + "\n" for ln in sums))
    for marker in (None, f"{'0' * 64}\n{planted / 'env'}\n"):
        if marker is not None:
            (planted / "env" / ".kit-unpacked").write_text(marker)
        out = subprocess.run([str(planted / "run.sh"), "unpack"], capture_output=True, text=True, env=clean)
        assert out.returncode == 1 and "relocating" not in out.stderr, out.stderr
        assert ("were not packed" if marker is None else "run-sh.key is missing") in out.stderr, out.stderr
        assert not pwned.exists(), "the carrier's conda-unpack ran"
    shutil.rmtree(planted)

    port = free_port()
    log = tmp_path / "run.log"
    proc = start_unpacked(root, port, log, cwd=elsewhere, extra_env={"KIT_STATE_DIR": str(state)})
    try:
        t = time.monotonic()
        wait_ready(f"http://127.0.0.1:{port}", proc, 60, log)
        print(f"ready in {time.monotonic() - t:.1f}s")
        info = _get(f"http://127.0.0.1:{port}/info")
    finally:
        stop_group(proc, timeout=30, whole_group=True)
    assert proc.returncode == 0, log.read_text()
    text = log.read_text()
    assert "conda-unpack" in text and "verified" in text, text
    assert info["prefix"] == str(env_dir)
    assert info["config_prefix"] == str(env_dir)  # conda-unpack rewrote the placeholder in sysconfig data
    assert Path(info["kit"]).is_relative_to(env_dir) and Path(info["flask"]).is_relative_to(env_dir)
    assert not any(str(tmp_path / "src") in p or str(prefix) in p for p in info["sys_path"])
    assert info["version"] == 1 and info["model_sha256"] == mv.files["model.pt2"]

    # conda-unpack rewrote prefixes in env/: later starts check env/ against the hashes run.sh took right
    # after relocating (having checked the packed ones first), so a relocated file edited since is refused.
    assert (env_dir / ".kit-unpacked.sha256").is_file() and (state / "run-sh.key").is_file()
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 0 and "nothing added" in out.stderr, out.stderr
    (sysconfig_data,) = env_dir.glob("lib/python*/_sysconfigdata*.py")
    packed = (root / "kit-pack.sha256").read_text()
    rel = str(sysconfig_data.relative_to(root))
    relocated = (env_dir / ".kit-unpacked.sha256").read_text()
    (before,) = [line.split()[0] for line in packed.splitlines() if line.endswith(f"  {rel}")]
    (after,) = [line.split()[0] for line in relocated.splitlines() if line.endswith(f"  {rel}")]
    assert before != after  # conda-unpack rewrote it: the packed hash no longer holds, the relocated one does
    original = sysconfig_data.read_bytes()
    sysconfig_data.write_bytes(original + b"\n# edited\n")
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and f"{rel}: sha256 differs" in out.stderr, out.stderr
    sysconfig_data.write_bytes(original)

    # Moving the relocated environment again is refused with the fix.
    moved = elsewhere / "moved"
    shutil.move(str(root), moved)
    out = subprocess.run([str(moved / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "Extract the archive again" in out.stderr


# --------------------------------------------------------------------------- the real Kit service, with torch


# kit's runtime without torch (and what only torch needs), onnxruntime and what it requires; flask stays in
# the prefix (the shipped set leaves it out).
ORT_DISTS = [d for d in conda_env.SERVING_DISTS if d not in ("torch", "sympy", "mpmath", "networkx", "fsspec")] \
    + ["onnxruntime", "flatbuffers", "protobuf"]


def test_conda_prefix_with_onnxruntime_packs_without_torch_and_passes_verify(tmp_path, repo_root, registered):
    """The onnxruntime backend from a conda-format prefix that has no torch at all: the shipped set, kit
    pack --verify (conda-unpack, the stored example on onnxruntime, the import audit)."""
    from kit.pack import verify_archive
    from kit.servicegen import generate

    prefix, times = conda_env.kit_prefix(tmp_path, repo_root, ORT_DISTS, "kitort")
    registry, mv = registered
    registry.promote(mv.name, mv.version, force=True, why="test")  # gates are the gate area's
    svc = generate("digits-ort", mv.name, registry=registry.root, out_dir=tmp_path / "services", workers=1,
                   backend="onnxruntime")
    lines: list[str] = []
    res = pack(svc, out_dir=tmp_path / "dist", env_prefix=prefix, progress=lines.append, compresslevel=1)
    times["pack"] = res.seconds
    assert res.kind == "conda" and res.backend == "onnxruntime" and res.forced == ()  # no torch: information only
    assert "onnxruntime" in res.shipped and "torch" not in res.shipped and "flask" in res.left_out
    assert any(line.startswith("packages (onnxruntime backend)") for line in lines)
    t = time.monotonic()
    rep = verify_archive(res.archive, timeout=180)
    times["verify"] = time.monotonic() - t
    print(f"conda onnxruntime archive {res.size_bytes / 1e6:.0f} MB; "
          + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    assert rep.ok and rep.max_abs_diff <= 1e-4 and rep.audit is not None
    assert rep.audit["from_env"] > 200 and rep.audit["from_stdlib"] == 0, rep.audit


