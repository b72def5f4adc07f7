"""The conda path with torch: a conda-format prefix (py-rattler, offline; tests/fixtures/conda_env.py) holding
torch, numpy and every runtime dependency of kit, kit installed from its wheel, packed by the real conda-pack
and serving the real generated Kit service from another directory after the prefix, the registry and the
service are gone: run.sh's start-up checks (first start, later start), the stored example answered from the
unpacked environment's python and torch. (Its own file so that make test's per-file workers run it beside
test_pack_conda.py: it is the suite's longest single test, ~2.5 CPU-minutes on a fresh clone.) It runs in the
environment-build tier with the container image test; the conda mechanics without torch stay in make test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kit._proc import free_port, stop_group
from kit.pack import pack
from kit.pack.verify import extract, start_unpacked, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import conda_env  # noqa: E402

# The environment-build tier (`make test-image`, with the container image): CI runs it when its inputs change
# (.ci/image-key: kit/pack, kit/templates, the environment, this file and tests/fixtures/conda_env.py).
pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(600)]


@pytest.fixture
def serving_prefix(tmp_path, repo_root):
    """python, torch, numpy, flask, gunicorn, every other runtime dependency of kit, kit from its wheel."""
    return conda_env.kit_prefix(tmp_path, repo_root, conda_env.SERVING_DISTS, "kitserve")



def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_conda_prefix_with_torch_packs_and_serves_the_real_kit_service(serving_prefix, registered, tmp_path):
    import numpy as np

    from kit.servicegen import generate

    prefix, times = serving_prefix
    site = prefix / "lib" / f"python{conda_env.PY_VER}" / "site-packages"
    assert (site / "torch" / "lib").is_dir() and (prefix / "conda-meta" / "history").is_file()
    assert not list(site.glob("__editable__*")) and list(site.glob("kit-*.dist-info"))  # kit from its wheel
    registry, mv = registered
    # Gates are tested by the gate area (tests/e2e/test_gate*.py); promotion is forced here.
    registry.promote(mv.name, mv.version, force=True, why="test")
    svc = generate("digits", mv.name, registry=registry.root, out_dir=tmp_path / "services", workers=1)

    lines: list[str] = []
    res = pack(svc, out_dir=tmp_path / "dist", env_prefix=prefix, progress=lines.append, compresslevel=1)
    times["pack"] = res.seconds
    times["conda_pack_layer"] = res.timings.get("env_layer", 0.0)
    assert res.kind == "conda" and res.models == {"demo-digits": [1]}
    assert res.forced == ()  # same python and torch as the model was captured with: nothing overridden
    assert any(line.startswith("conda-pack:") for line in lines)
    assert res.env_bytes > 500e6  # torch is in it
    assert "torch" in res.shipped and "flask" in res.left_out  # the service's closure; flask is not in it
    assert any(line.startswith("packages (torch backend)") for line in lines)

    # Only the archive moves on; the prefix, the registry and the service are gone.
    elsewhere = tmp_path / "server"
    elsewhere.mkdir()
    archive = elsewhere / res.archive.name
    shutil.move(str(res.archive), archive)
    for p in (prefix, registry.root, svc, tmp_path / "dist"):
        shutil.rmtree(p)
    t = time.monotonic()
    root = extract(archive, elsewhere / "opt")
    times["extract"] = time.monotonic() - t
    env_dir = root / "env"
    assert (env_dir / "bin" / "conda-unpack").is_file()

    # run.sh's start-up checks alone: the first start checks the packed list, relocates and records; a later
    # start checks env/ against that record (its MAC under the host key) and the rest against the list.
    state = {"KIT_STATE_DIR": str(tmp_path / "state")}
    for when in ("first", "later"):
        t = time.monotonic()
        out = subprocess.run([str(root / "run.sh"), "unpack"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], **state})
        times[f"{when}_start_checks"] = time.monotonic() - t
        assert out.returncode == 0, out.stderr
        assert ("nothing added" if when == "first" else "sealed tree unchanged") in out.stderr, out.stderr
        assert ("conda-unpack" in out.stderr) == (when == "first"), out.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    try:
        t = time.monotonic()
        proc = start_unpacked(root, port, log, cwd=elsewhere, extra_env=state)
        try:
            wait_ready(url, proc, 180, log)
            times["ready"] = time.monotonic() - t
            with np.load(root / "registry" / mv.name / "versions" / "1" / "example.npz", allow_pickle=False) as z:
                x, ref = z["input_0"].copy(), z["output_0"].copy()
            t = time.monotonic()
            body = _post(url + "/predict", {"inputs": x.tolist()})
            times["first_answer"] = time.monotonic() - t
            # The serving processes run the unpacked environment's python with its torch.
            master_exe = Path(os.readlink(f"/proc/{proc.pid}/exe")).resolve()
            workers = _children(proc.pid)
            maps = {w: Path(f"/proc/{w}/maps").read_text() for w in workers}
        finally:
            stop_group(proc, timeout=30, whole_group=True)
        assert proc.returncode == 0, log.read_text()
        text = log.read_text()
        assert "verified" in text, text
        assert body["model_version"] == 1
        got = np.asarray(body["outputs"], dtype=ref.dtype)
        assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-5), (got, ref)
        assert master_exe.is_relative_to(env_dir.resolve()), master_exe
        assert workers, "gunicorn started no worker"
        for w, m in maps.items():
            torch_libs = {ln.split()[-1] for ln in m.splitlines() if "libtorch_cpu.so" in ln}
            assert torch_libs and all(Path(p).is_relative_to(env_dir.resolve()) for p in torch_libs), (w, torch_libs)
        # kit pack --verify on a conda archive (unpacked again, conda-unpack, the example, the import audit) is
        # test_pack_conda.py's onnxruntime prefix and, with torch, test_pack_venv.py: not repeated on 1.5 GB here
    finally:
        print(f"archive {res.size_bytes / 1e6:.0f} MB (environment {res.env_bytes / 1e6:.0f} MB in files); "
              + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
        shutil.rmtree(elsewhere / "opt", ignore_errors=True)  # the archive stays with the test's tmp_path
