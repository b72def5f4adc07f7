"""Issue 19's real-model zoo, one model end to end (the body of tests/e2e/test_zoo_real*.py, which split the
zoo in three files so that pytest-xdist's per-file workers run them at once). See tests/e2e/test_zoo_real.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from kit_testing import project_keyring

from kit.gate import render_text, run_gate
from kit.registry import Registry
from kit.servicegen import generate, start_service
from kit.serving.protocol import NUMPY_TO_V2
from zoo.real import RealEntry, eager, nudged

GATE_PARAMS = {"batch_n": 8, "latency_repeats": 10}


@dataclass
class Deployed:
    zoo: RealEntry
    reg: Registry
    model: torch.nn.Module  # the production version's eager model
    production: int
    gates: dict[int, Any] = field(default_factory=dict)  # version -> GateResult
    times: dict[str, float] = field(default_factory=dict)


def _gate_and_promote(d: Deployed, version: int) -> None:
    t0 = time.perf_counter()
    g = run_gate(d.reg, d.zoo.name, version, params=GATE_PARAMS, timeout=600)
    d.times[f"gate_v{version}_s"] = round(time.perf_counter() - t0, 1)
    d.gates[version] = g
    if g.passed:  # no force: a failed gate leaves production where it was, and the test below says why
        d.reg.promote(d.zoo.name, version)
        d.production = version


def _deploy(z: RealEntry, root: Path) -> Deployed:
    """v1 captured, registered, gated and promoted; for ``compare`` models v2 gated against it and promoted."""
    reg = Registry(root / "registry", require_gate=True, user="zoo", keyring=project_keyring())
    d = Deployed(z, reg, z.model(), production=0)
    t0 = time.perf_counter()
    mv = reg.register(z.name, d.model, z.example(), dynamic=z.dynamic or None, dims=z.dims or None)
    d.times["capture_register_s"] = round(time.perf_counter() - t0, 1)
    _gate_and_promote(d, mv.version)
    if z.compare and d.production == mv.version:
        v2 = nudged(z.model())
        mv2 = reg.register(z.name, v2, z.example(), dynamic=z.dynamic or None, dims=z.dims or None)
        _gate_and_promote(d, mv2.version)
        if d.production == mv2.version:
            d.model = v2
    return d


def _check_onnx_record(d: Deployed) -> None:
    rec = d.reg.get(d.zoo.name, 1).capture["onnx"]
    assert rec["exported"] is d.zoo.onnx, rec.get("reason")


def _check_gates(d: Deployed) -> None:
    assert set(d.gates) == ({1, 2} if d.zoo.compare else {1})
    for version, g in d.gates.items():
        assert g.passed, f"{d.zoo.name}@{version}: {render_text(g)}"
    assert d.gates[1].baseline["version"] is None  # nothing in production: its own checks
    if d.zoo.compare:
        assert d.gates[2].baseline["version"] == 1
        names = [c.name for c in d.gates[2].checks]
        assert "same signature as production" in names and any(n.startswith("latency vs production") for n in names)
        assert any(n.startswith("output agreement vs production") for n in names)
    assert d.production == max(d.gates) and d.reg.aliases(d.zoo.name).production == d.production


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
    for k, v in inputs.items():
        arr = np.ascontiguousarray(v.numpy())
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


def _check_served(d: Deployed, backend: str, out: Path) -> None:
    """The production version served by gunicorn on ``backend`` answers equal to eager."""
    z = d.zoo
    if backend == "onnxruntime":  # the verdict is per backend: gate the production version on the one that serves
        t0 = time.perf_counter()
        g = run_gate(d.reg, z.name, d.production, params=GATE_PARAMS, timeout=600, backend=backend)
        d.times["gate_onnxruntime_s"] = round(time.perf_counter() - t0, 1)
        assert g.passed, f"{z.name}@{d.production} on onnxruntime: {render_text(g)}"
    svc = generate(f"{z.name}-{backend}", z.name, registry=d.reg.root, out_dir=out, workers=1, threads=2,
                   backend=backend, trusted_keys=d.reg.keyring.service_keys())
    mv = d.reg.get(z.name, d.production)
    atol, rtol = max(mv.capture["parity"]["atol"], 1e-5), max(mv.capture["parity"]["rtol"], 1e-4)
    if backend == "onnxruntime":
        onnx_parity = mv.capture["onnx"]["parity"]
        atol, rtol = max(atol, onnx_parity["atol"]), max(rtol, onnx_parity["rtol"])
    with start_service(svc, timeout=240) as running:
        d.times[f"ready_{backend}_s"] = round(running.started_seconds, 1)
        for batch, seq, seed, via in ((1, z.seqs[0], 11, "predict"), (3, z.seqs[1], 12, "v2-binary")):
            inputs = z.inputs(batch, seq, seed)
            if via == "predict":
                status, got, headers = _predict(running.url, inputs, mv.signature["output_kind"])
            else:
                status, got, headers = _v2_binary(running.url, z.name, inputs)
            assert status == 200, got
            assert headers["X-Kit-Model-Version"] == str(d.production)
            want = eager(d.model, inputs)
            assert list(got) == list(want), (list(got), list(want))
            for k, w in want.items():
                np.testing.assert_allclose(np.asarray(got[k], dtype=np.float64), w, atol=atol, rtol=rtol,
                                           err_msg=f"{z.name} on {backend} via {via}, output {k}, batch {batch}")


def check_model(z: RealEntry, tmp_path: Path, artifacts_dir: Path) -> None:
    """Deploy ``z`` (v1, and v2 against it for ``compare`` models) and serve it on each backend."""
    d = _deploy(z, tmp_path)
    try:
        _check_onnx_record(d)  # capture says whether model.onnx exists (and why not)
        _check_gates(d)  # the default gate: v1 on its own checks, v2 against v1, both promoted without force
        for backend in ("torch", "onnxruntime") if z.onnx else ("torch",):
            _check_served(d, backend, tmp_path)
    finally:
        path = artifacts_dir / "zoo_real_times.json"
        with filelock.FileLock(str(path) + ".lock"):  # three files' workers write the one table
            table = json.loads(path.read_text()) if path.is_file() else {}
            table[z.name] = d.times
            path.write_text(json.dumps(table, indent=2) + "\n")
