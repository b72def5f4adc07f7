"""Issue 19's real-model zoo, one model end to end from Kit's installed wheel (the body of
tests/e2e/test_zoo_real.py, which says what is checked).

The deploy runs as a researcher runs it: a venv with Kit's wheel (``kit[notebook,onnx]``) and transformers
(tests/fixtures/kit_wheel.py), a project folder with the model code (tests/zoo copied to ``zoo/``) and
kit.toml, and tests/zoo/wheel_deploy.py (%deploy's ``kit.deploy.deploy`` per version); its services run under
the venv's gunicorn. This process checks the gates and the answers against eager, computed here from the
same seeded definitions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch

from kit.servicegen import start_service
from kit.serving.protocol import NUMPY_TO_V2
from zoo.real import RealEntry, eager, nudged

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import kit_wheel  # noqa: E402

ZOO = Path(__file__).resolve().parent
MODEL_CODE = ("__init__.py", "real.py", "tv_ops.py", "tv_cnn.py", "tv_vit.py")


def _run_deploy(z: RealEntry, root: Path, repo_root: Path) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """wheel_deploy.py for ``z`` in a fresh project folder, with the wheel venv's python: its report, the
    venv's python and the project's environment (its own signing key, cache and home)."""
    python = kit_wheel.shared_venv(repo_root, ("notebook", "onnx"), ("transformers",))
    project = root / "project"
    (project / "zoo").mkdir(parents=True)
    for f in MODEL_CODE:  # the researcher's model code, beside the script
        shutil.copy(ZOO / f, project / "zoo" / f)
    shutil.copy(ZOO / "wheel_deploy.py", project / "deploy_zoo.py")
    (project / "kit.toml").write_text('registry = "registry"\n')
    env = kit_wheel.clean_env(python.parent.parent, KIT_KEYS_DIR=str(root / "keys"), HOME=str(root / "home"),
                              KIT_CACHE_DIR=str(root / "cache"))
    res = subprocess.run([str(python), "deploy_zoo.py", z.name], cwd=project, env=env, capture_output=True,
                         text=True, timeout=1300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(report["kit"]).is_relative_to(python.parent.parent), report["kit"]  # the wheel's kit, not ours
    return report, python, env


def _check_gates(z: RealEntry, report: dict[str, Any]) -> None:
    """The default gate without force: v1 on its own checks, v2 against v1 as production; both promoted."""
    gates = report["gates"]
    assert report["onnx"]["exported"] is z.onnx, report["onnx"].get("reason")  # capture says why not
    assert {"1", "2"} <= set(gates), gates.keys()
    for version, g in gates.items():
        assert g["passed"], f"{z.name}@{version}: {g['text']}"
    assert gates["1"]["baseline"] is None  # nothing in production: its own checks
    names = gates["2"]["checks"]
    assert gates["2"]["baseline"] == 1, gates["2"]["text"]
    assert "same signature as production" in names and any(n.startswith("latency vs production") for n in names)
    assert any(n.startswith("output agreement vs production") for n in names)
    assert report["production"] == 2
    assert set(report["services"]) == ({"torch", "onnxruntime"} if z.onnx else {"torch"})


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:1000], exc.headers


def _predict(url: str, inputs: dict[str, torch.Tensor], kind: str) -> tuple[int, Any, Any]:
    """/predict with JSON numbers (half-precision inputs sent as plain floats); outputs keyed by name."""
    doc = {"inputs": {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v).tolist()
                      for k, v in inputs.items()}}
    status, body, headers = _post(url + "/predict", json.dumps(doc).encode())
    if status == 200:
        body = body["outputs"] if kind == "dict" else {"output_0": body["outputs"]}
    return status, body, headers


def _v2_binary(url: str, name: str, inputs: dict[str, torch.Tensor]) -> tuple[int, Any, Any]:
    """v2 /infer with binary input tensors (3 images at 224 px are over the JSON body limit); JSON outputs."""
    entries, blobs = [], []
    for k, v in inputs.items():  # bfloat16 travels as FP32 (v2 has no BF16; the service rounds it)
        arr = np.ascontiguousarray((v.float() if v.dtype == torch.bfloat16 else v).numpy())
        entries.append({"name": k, "shape": list(arr.shape), "datatype": NUMPY_TO_V2[arr.dtype.name],
                        "parameters": {"binary_data_size": arr.nbytes}})
        blobs.append(arr.tobytes())
    head = json.dumps({"inputs": entries}).encode()
    status, body, headers = _post(f"{url}/v2/models/{name}/infer", head + b"".join(blobs),
                                  {"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
    if status == 200:
        body = {o["name"]: np.asarray(o["data"], dtype=np.float64).reshape(o["shape"]) for o in body["outputs"]}
    return status, body, headers


def _tolerance(report: dict[str, Any], backend: str) -> tuple[float, float]:
    """The tolerance capture recorded for the production version (and for its ONNX program on onnxruntime)."""
    atol, rtol = max(report["parity"]["atol"], 1e-5), max(report["parity"]["rtol"], 1e-4)
    if backend == "onnxruntime":
        atol, rtol = max(atol, report["onnx"]["parity"]["atol"]), max(rtol, report["onnx"]["parity"]["rtol"])
    return atol, rtol


def _check_served(z: RealEntry, model: torch.nn.Module, report: dict[str, Any], backend: str,
                  python: Path, env: dict[str, str], times: dict[str, Any]) -> None:
    """The production version served by the venv's gunicorn on ``backend`` answers equal to eager."""
    production = report["production"]
    atol, rtol = _tolerance(report, backend)
    with start_service(Path(report["services"][backend]), env=env, python=str(python), timeout=240) as running:
        times[f"ready_{backend}_s"] = round(running.started_seconds, 1)
        for batch, seq, seed, via in ((1, z.seqs[0], 11, "predict"), (3, z.seqs[1], 12, "v2-binary")):
            inputs = z.inputs(batch, seq, seed)
            if via == "predict":
                status, got, headers = _predict(running.url, inputs, report["output_kind"])
            else:
                status, got, headers = _v2_binary(running.url, z.name, inputs)
            assert status == 200, got
            assert headers["X-Kit-Model-Version"] == str(production)
            want = eager(model, inputs)
            assert list(got) == list(want), (list(got), list(want))
            for k, w in want.items():
                np.testing.assert_allclose(np.asarray(got[k], dtype=np.float64), w, atol=atol, rtol=rtol,
                                           err_msg=f"{z.name} on {backend} via {via}, output {k}, batch {batch}")


def check_model(z: RealEntry, tmp_path: Path, artifacts_dir: Path, repo_root: Path) -> None:
    """Deploy ``z`` from the wheel (v1, then v2 judged against it), serve production on each backend."""
    report, python, env = _run_deploy(z, tmp_path, repo_root)
    times: dict[str, Any] = dict(report["times"])
    try:
        _check_gates(z, report)
        model = z.model() if report["production"] == 1 else nudged(z.model())  # the same seeded definitions
        for backend in report["services"]:
            _check_served(z, model, report, backend, python, env, times)
    finally:
        path = artifacts_dir / "zoo_real_times.json"
        with filelock.FileLock(str(path) + ".lock"):  # three files' workers write the one table
            table = json.loads(path.read_text()) if path.is_file() else {}
            table[z.name] = times
            path.write_text(json.dumps(table, indent=2) + "\n")
