"""The onnxruntime backend, served for real: `generate(..., backend="onnxruntime")`, gunicorn with 2 workers on
127.0.0.1, real onnxruntime sessions. One service start serves a two-input model (int64 ids + an int64 mask,
a dynamic ``seq``, a dict output) for every check: /predict, v2 JSON and v2 binary equal eager torch; hot
reload under load with 0 failed requests; sticky canary routing; batching and metrics; no torch mapped in
the master or any worker; and a version without model.onnx promoted while it runs (the old version keeps
serving and /readyz says why). The single-input MLP runs through the ASGI test client (no server).

Promotions use force=True, why="test": gates are tested in the gate area (and on onnxruntime there).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kit_testing import start_load, unexpected_versions, wait_all_workers
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service
from kit.serving.router import user_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "onnx-text"
DYNAMIC = {"ids": {1: "seq"}, "mask": {1: "seq"}}
LAG = 3.0  # seconds a worker may take to follow an alias move (poll 0.2 s + load + check)


class Text(nn.Module):
    """Embedding + masked mean pooling + a head: int64 ids and mask of any seq in 2..16, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        return {"logits": logits, "score": logits.max(dim=1).values}


def _text(seed: int) -> Text:
    torch.manual_seed(seed)
    return Text().eval()


def _eager(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    reg = Registry(root / "registry", require_gate=True, user="e2e")
    example = (torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0)),
               torch.ones(2, 5, dtype=torch.int64))
    models = {}
    for seed in (1, 2, 3):
        mv = reg.register(MODEL, _text(seed), example, dynamic=DYNAMIC, dims={"seq": (2, 16)})
        assert mv.capture["onnx"]["exported"], mv.capture["onnx"]
        models[mv.version] = _text(seed)
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("onnx", MODEL, registry=reg.root, out_dir=root / "services", workers=2, poll_interval=0.2,
                 backend="onnxruntime")
    with start_service(d, timeout=90) as running:
        yield reg, running, models
    assert not running.alive()


def _request(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    status, data, h = _request(url, json.dumps(body).encode(), headers)
    return status, json.loads(data), h


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read()
            return r.status, json.loads(data) if "json" in r.headers.get("Content-Type", "") else data.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _inputs(rows: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (rows, seq), dtype=np.int64)
    mask = (rng.random((rows, seq)) < 0.8).astype(np.int64)
    mask[:, 0] = 1
    return ids, mask


def _binary_infer(url: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """v2 with the binary tensor data extension both ways (what tritonclient sends for numpy arrays)."""
    head = json.dumps({"inputs": [
        {"name": n, "shape": list(a.shape), "datatype": "INT64", "parameters": {"binary_data_size": a.nbytes}}
        for n, a in (("ids", ids), ("mask", mask))], "parameters": {"binary_data_output": True}}).encode()
    status, data, headers = _request(url, head + ids.tobytes() + mask.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(head)),
                                      "Content-Type": "application/octet-stream"})
    assert status == 200, data[:300]
    n = int(headers["Inference-Header-Content-Length"])
    doc, offset, out = json.loads(data[:n]), n, {}
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(data[offset:offset + size], np.float32).reshape(o["shape"])
        offset += size
    return out


def test_predict_v2_json_and_v2_binary_equal_eager_at_any_seq(svc):
    reg, running, models = svc
    infer = f"{running.url}/v2/models/{MODEL}/infer"
    for seq in (3, 9, 16):
        ids, mask = _inputs(3, seq, seed=seq)
        want = _eager(models[1], ids, mask)
        status, body, headers = _post(running.url + "/predict", {"inputs": {"ids": ids.tolist(), "mask": mask.tolist()}})
        assert status == 200 and body["model_version"] == 1 and headers["X-Kit-Model-Version"] == "1", body
        assert list(body["outputs"]) == ["logits", "score"]  # the dict output keeps its names and order
        for name in want:
            np.testing.assert_allclose(np.asarray(body["outputs"][name]), want[name], rtol=1e-4, atol=1e-5)
        status, body, _ = _post(infer, {"inputs": [
            {"name": "mask", "shape": [3, seq], "datatype": "INT64", "data": mask.reshape(-1).tolist()},
            {"name": "ids", "shape": [3, seq], "datatype": "INT64", "data": ids.reshape(-1).tolist()}]})
        assert status == 200, body
        for o in body["outputs"]:
            np.testing.assert_allclose(np.asarray(o["data"]).reshape(o["shape"]), want[o["name"]], rtol=1e-4, atol=1e-5)
        got = _binary_infer(infer, ids, mask)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    status, body, _ = _post(running.url + "/predict", {"inputs": {"ids": [[1] * 17], "mask": [[1] * 17]}})
    assert status == 400 and "seq from 2 to 16" in body["error"]  # checked before onnxruntime sees it


def test_metadata_and_readiness_name_the_backend(svc):
    _, running, _ = svc
    _, meta = _get(f"{running.url}/v2/models/{MODEL}")
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == [-1, -1]
    _, ready = _get(running.url + "/readyz")
    assert ready["backend"] == "onnxruntime" and ready["production"]["backend"] == "onnxruntime"


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def test_no_torch_in_the_master_or_any_worker(svc):
    _, running, _ = svc
    workers = _children(running.pid)
    assert len(workers) == 2, workers
    for pid in (running.pid, *workers):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"process {pid} has torch mapped"
        if pid != running.pid:
            assert "libonnxruntime" in maps, f"worker {pid} serves without onnxruntime mapped?"


def test_hot_reload_under_load_and_sticky_canary(svc, tmp_path):
    reg, running, _ = svc
    ids, mask = _inputs(1, 6)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"inputs": {"ids": ids.tolist(), "mask": mask.tolist()}}))
    out = tmp_path / "load.json"
    load = start_load(running.url + "/predict", body, out, concurrency=8, duration=10, users=30)
    try:
        events = [(time.perf_counter(), {1})]
        time.sleep(1.5)
        reg.promote(MODEL, 2, force=True, why="test")
        events.append((time.perf_counter(), {2}))
        wait_all_workers(running.url, lambda b: b["production"]["version"] == 2)
        reg.set_canary(MODEL, 3, 0.5, force=True, why="test")
        events.append((time.perf_counter(), {2, 3}))
        wait_all_workers(running.url, lambda b: b["canary"] and b["canary"]["version"] == 3)
        t_stable = time.perf_counter()
        assert load.wait(30) == 0
        t_end = time.perf_counter()
    finally:
        if load.poll() is None:
            load.kill()
    result = json.loads(out.read_text())
    records = result["records"]
    assert result["errors"] == [] and result["summary"]["failed"] == 0, result["summary"]
    assert all(r[2] == 200 for r in records) and len(records) > 200, result["summary"]

    bad = unexpected_versions(records, events, LAG)
    assert not bad, f"{len(bad)} responses from unexpected versions, e.g. {bad[:3]}"
    users: dict[str, set[int]] = {}
    for t, _, _, version, user in records:
        if user is not None and t_stable <= t <= t_end:
            users.setdefault(user, set()).add(int(version))
    assert len(users) >= 10, len(users)
    for user, versions in users.items():  # sticky: every request of a user on the version its hash picks
        assert versions == {3 if user_bucket(MODEL, user) < 0.5 else 2}, (user, versions)


def _metric_sum(text: str, prefix: str, *needles: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and all(n in line for n in needles))


def test_batching_happened_and_metrics_are_there(svc):
    _, running, _ = svc
    _, text = _get(running.url + "/metrics")
    assert _metric_sum(text, "kit_backend{", 'backend="onnxruntime"') == 2  # one per worker
    assert _metric_sum(text, "kit_requests_total{", 'code="200"') > 200
    assert "kit_served_version{" in text and "kit_request_seconds_bucket{" in text
    requests = _metric_sum(text, "kit_batch_rows_count{")
    alone = _metric_sum(text, "kit_batch_rows_bucket{", 'le="1.0"')
    assert requests > alone, "no request shared a forward pass under 8 concurrent connections"


def test_a_version_without_onnx_keeps_the_old_one_serving(svc):
    reg, running, _ = svc
    _, before, _ = _post(running.url + "/predict", {"inputs": {"ids": [[1, 2, 3]], "mask": [[1, 1, 1]]}},
                         {"X-Kit-Version": "production"})
    serving = before["model_version"]
    mv = reg.register(MODEL, _text(4), (torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.int64)),
                      dynamic=DYNAMIC, dims={"seq": (2, 16)}, onnx=False)
    assert mv.capture["onnx"]["exported"] is False
    reg.promote(MODEL, mv.version, force=True, why="test")
    body = wait_all_workers(running.url, lambda b: b["reload_error"] is not None)
    assert "model.onnx" in body["reload_error"]["error"] and body["status"].startswith("degraded"), body
    assert body["production"]["version"] == serving
    for _ in range(10):
        status, out, _ = _post(running.url + "/predict", {"inputs": {"ids": [[1, 2, 3]], "mask": [[1, 1, 1]]}},
                               {"X-Kit-Version": "production"})
        assert status == 200 and out["model_version"] == serving and out["outputs"] == before["outputs"]


def test_the_mlp_through_the_asgi_app_equals_eager(tmp_path):
    """The single-input model (a bare array out) on the same path, without a server."""
    from kit.demo import DigitsMLP
    from kit.serving import load_service_config
    from kit.serving.asgi import create_asgi_app

    reg = Registry(tmp_path / "registry", require_gate=True, user="t")
    model = DigitsMLP().eval()
    reg.register("mlp", model, torch.rand(2, 64))
    reg.promote("mlp", 1, force=True, why="test")
    app = create_asgi_app(load_service_config(generate("mlp", "mlp", registry=reg.root, out_dir=tmp_path,
                                                       backend="onnxruntime")), watch=False)
    try:
        client = app.test_client()
        x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        r = client.post("/predict", json={"inputs": x.tolist()})
        np.testing.assert_allclose(np.asarray(r.json["outputs"]), want, rtol=1e-4, atol=1e-5)
        r = client.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "pixels", "shape": [4, 64], "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        np.testing.assert_allclose(np.asarray(r.json["outputs"][0]["data"]).reshape(4, 10), want, rtol=1e-4, atol=1e-5)
    finally:
        app.close()
