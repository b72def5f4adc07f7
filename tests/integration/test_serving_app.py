"""The serving app through a test client (the ASGI app on a real event loop with its inference thread),
one suite of cases run over every backend of :data:`kit.backends.BACKENDS` (as uvicorn's HTTP tests run
over every protocol implementation): endpoints, client errors, auth, limits, hot reload, routing,
metrics, and a fuzz test that no client input produces a 500.

Promotions use force=True, why="test": gates are another area's job (tested there).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit import backends
from kit.demo import DigitsMLP
from kit.registry import Registry
from kit.servicegen import generate
from kit.serving import load_service_config
from kit.serving.asgi import create_asgi_app
from kit.serving.security import hash_key

MODEL = "app-digits"
KEY = "s3cret-key"


def _mlp(seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP().eval()


def _capture_kw(backend: str) -> dict[str, bool]:
    """What capture needs for ``backend``: a format exported beside the program is asked for."""
    return {"onnx": True} if backends.get(backend).export is not None else {}


@pytest.fixture(scope="module")
def reg(tmp_path_factory, engine):
    root = tmp_path_factory.mktemp("app")
    reg = Registry(root / "registry", require_gate=True, user="test")
    ex = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        reg.register(MODEL, _mlp(seed), ex, **_capture_kw(engine))
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested by the gate area
    return reg


def _build(config, engine):
    return create_asgi_app(config, watch=False)


@pytest.fixture(scope="module", params=backends.names())
def engine(request):
    """The backend under test: every row of kit.backends.BACKENDS runs the same cases (the ASGI app on each)."""
    return request.param


def _app(reg, tmp_path, engine, **options):
    options.setdefault("backend", engine)
    d = generate("svc", MODEL, registry=reg.root, out_dir=tmp_path, force=True, **options)
    return _build(load_service_config(d), engine)


@pytest.fixture(scope="module")
def client(reg, tmp_path_factory, engine):
    app = _app(reg, tmp_path_factory.mktemp("svc"), engine, api_keys_sha256=(hash_key(KEY),),
               max_body_bytes=64 * 1024)
    return app.test_client()


H = {"X-API-Key": KEY}


def test_predict_matches_the_model_and_names_the_version(client, reg):
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    r = client.post("/predict", json={"inputs": x.tolist()}, headers=H)
    assert r.status_code == 200, r.json
    assert r.json["model_version"] == 1 and r.headers["X-Kit-Model-Version"] == "1"
    expect = _mlp(1)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(r.json["outputs"]), expect, rtol=1e-4, atol=1e-5)
    single = client.post("/predict", json={"inputs": x[0].tolist()}, headers=H)  # one row, no batch dim
    np.testing.assert_allclose(np.asarray(single.json["outputs"]), expect[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"x": 1}', 400, "pixels: float32[batch, 64]"),
    (json.dumps({"inputs": [[1.0] * 63]}).encode(), 400, "expected [batch, 64]"),
    (json.dumps({"inputs": [[1.0] * 64, [1.0] * 3]}).encode(), 400, "regular nested list"),
    (json.dumps({"inputs": [["a"] * 64]}).encode(), 400, "float32"),
    (b'{"inputs": [[1e39' + b", 1.0" * 63 + b"]]}", 400, "NaN or infinite"),
    (json.dumps({"inputs": []}).encode(), 400, "expected [batch, 64]"),
    (json.dumps({"inputs": [[True] * 64]}).encode(), 400, "float32"),
])
def test_client_errors_name_what_was_expected(client, body, status, words):
    r = client.post("/predict", data=body, headers={**H, "Content-Type": "application/json"})
    assert r.status_code == status and words in r.json["error"], r.json


def test_too_large_unauthenticated_and_unknown(client):
    big = client.post("/predict", data=b"[" * (65 * 1024), headers=H)
    assert big.status_code == 413 and "65536 bytes" in big.json["error"]
    assert client.post("/predict", json={"inputs": [[0.0] * 64]}).status_code == 401
    assert client.post("/predict", json={"inputs": [[0.0] * 64]}, headers={"X-API-Key": "nope"}).status_code == 401
    bearer = client.post("/predict", json={"inputs": [[0.0] * 64]}, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # stay open
    assert client.get("/nope").status_code == 404 and client.get("/predict").status_code == 405
    r = client.post("/predict", json={"inputs": [[0.0] * 64]}, headers={**H, "X-Kit-Version": "9"})
    assert r.status_code == 404 and "not served here" in r.json["error"]


def test_rate_limit_answers_429(reg, tmp_path, engine):
    c = _app(reg, tmp_path, engine, rate_limit=1.0, rate_burst=2).test_client()
    codes = [c.post("/predict", json={"inputs": [[0.0] * 64]}).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
    r = c.post("/predict", json={"inputs": [[0.0] * 64]})
    assert "Rate limit" in r.json["error"] and int(r.headers["Retry-After"]) >= 1


def test_v2_json_and_binary(client):
    meta = client.get(f"/v2/models/{MODEL}").json
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    x = np.random.default_rng(2).random((2, 64), dtype=np.float32)
    r = client.post(f"/v2/models/{MODEL}/infer", headers=H, json={
        "inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.json
    out = r.json["outputs"][0]
    assert out["shape"] == [2, 10] and r.json["model_version"] == "1"
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": meta["outputs"][0]["name"], "parameters": {"binary_data": True}}]}).encode()
    rb = client.post(f"/v2/models/{MODEL}/infer", data=head + x.tobytes(),
                     headers={**H, "Inference-Header-Content-Length": str(len(head))})
    assert rb.status_code == 200
    n = int(rb.headers["Inference-Header-Content-Length"])
    got = np.frombuffer(rb.data[n:], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, np.asarray(out["data"], dtype=np.float32).reshape(2, 10), rtol=1e-6)
    bad = client.post(f"/v2/models/{MODEL}/infer", data=head + x.tobytes()[:-4],
                      headers={**H, "Inference-Header-Content-Length": str(len(head))})
    assert bad.status_code == 400 and "binary" in bad.json["error"]
    assert client.post("/v2/models/other/infer", headers=H, json={"inputs": []}).status_code == 404


def test_openapi_metrics_and_models(client):
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.") and "/predict" in doc["paths"] and "ApiKey" in doc["components"]["securitySchemes"]
    client.post("/predict", json={"inputs": [[0.0] * 64]}, headers=H)
    text = client.get("/metrics").data.decode()
    assert 'kit_requests_total{code="200",model="app-digits",route="production",version="1"}' in text
    assert "kit_request_seconds_bucket" in text and "kit_batch_rows_bucket" in text
    assert client.get("/v1/models").json["models"][0]["production"]["version"] == 1


def test_hot_reload_routing_and_failed_reload(reg, tmp_path, engine):
    app = _app(reg, tmp_path, engine)
    slots = app.service.slots
    c = app.test_client()
    reg.set_canary(MODEL, 2, 0.5, force=True, why="test")
    assert slots.refresh() is True
    assert c.post("/predict", json={"inputs": [[0.1] * 64]}, headers={"X-Kit-Version": "2"}).json["model_version"] == 2
    seen = {c.post("/predict", json={"inputs": [[0.1] * 64]}, headers={"X-Kit-User": "alice"}).json["model_version"]
            for _ in range(10)}
    assert len(seen) == 1  # sticky
    versions = [c.post("/predict", json={"inputs": [[0.1] * 64]}).json["model_version"] for _ in range(200)]
    assert 60 <= versions.count(2) <= 140  # 50% canary, far inside 4 standard deviations (+-28)
    # a corrupted new version: the old state keeps serving, the failure shows
    mv = reg.register(MODEL, _mlp(3), torch.rand(2, 64), **_capture_kw(engine))
    reg.promote(MODEL, mv.version, force=True, why="test")  # (promote itself refuses a corrupt version)
    (mv.path / "example.npz").write_bytes(b"corrupt")  # the files go bad after the promotion
    assert slots.refresh() is False
    ready = c.get("/readyz").json
    assert "IntegrityError" in ready["reload_error"]["error"] and ready["production"]["version"] == 1
    assert ready["canary"]["version"] == 2 and slots.reloads["failure"] == 1
    assert c.post("/predict", json={"inputs": [[0.1] * 64]}, headers={"X-Kit-Version": "1"}).status_code == 200
    assert 'kit_reloads_total{model="app-digits",result="failure"} 1.0' in c.get("/metrics").data.decode()
    reg.rollback(MODEL, why="test")  # production 1 again, canary ended
    assert slots.refresh() is True
    assert c.get("/readyz").json["reload_error"] is None and slots.state.canary is None


def test_not_ready_without_production(tmp_path, caplog, engine):
    reg = Registry(tmp_path / "registry", require_gate=True)
    reg.register("lonely", _mlp(0), torch.rand(2, 64), **_capture_kw(engine))
    d = generate("svc", "lonely", registry=reg.root, out_dir=tmp_path, backend=engine)
    with caplog.at_level(logging.ERROR):
        c = _build(load_service_config(d), engine).test_client()
    r = c.get("/readyz")
    assert r.status_code == 503 and "no production version" in r.json["status"]
    assert c.post("/predict", json={"inputs": [[0.0] * 64]}).status_code == 503


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-2**70, 2**70) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values, rows=st.integers(0, 3), width=st.sampled_from([0, 1, 63, 64, 65]))
def test_fuzz_predict_never_500(client, doc, rows, width):
    for body in (json.dumps({"inputs": doc}), json.dumps(doc), json.dumps({"inputs": [[0.5] * width] * rows})):
        r = client.post("/predict", data=body, headers={**H, "Content-Type": "application/json"})
        assert r.status_code in (200, 400), (body[:200], r.status_code, r.json)
        if r.status_code == 400:
            assert "expected" in r.json["error"].lower() or "send" in r.json["error"].lower(), r.json


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=json_values, shape=st.lists(st.integers(-1, 70), max_size=3),
       dt=st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", "FP16"]), binary=st.binary(max_size=600),
       hl=st.one_of(st.none(), st.integers(-5, 700)))
def test_fuzz_v2_never_500(client, inputs, shape, dt, binary, hl):
    bodies = [json.dumps({"inputs": inputs}).encode(),
              json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": dt, "data": inputs}]}).encode()]
    head = json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": dt,
                                   "parameters": {"binary_data_size": len(binary)}}]}).encode()
    for body, h in [(b, None) for b in bodies] + [(head + binary, hl if hl is not None else len(head))]:
        headers = dict(H)
        if h is not None:
            headers["Inference-Header-Content-Length"] = str(h)
        r = client.post(f"/v2/models/{MODEL}/infer", data=body, headers=headers)
        assert r.status_code in (200, 400), (body[:200], r.status_code, r.json)
