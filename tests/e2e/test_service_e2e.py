"""Real gunicorn (2 workers) on 127.0.0.1 (uvicorn workers, the ASGI app): promotion,
a 25% canary and a rollback under load, a failed
reload, metrics summed across workers, and a real Open Inference Protocol v2 client (tritonclient).

Promotions here use force=True, why="test": gates (the validation notebooks) are another area's job
and are tested there; this file tests what the service does when the aliases move.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kit_testing import get_json, unexpected_versions, wait_all_workers

from kit._io import atomic_write_json
from kit.demo import DigitsMLP
from kit.errors import IntegrityError
from kit.registry import Registry
from kit.servicegen import check_config, generate, start_service
from kit.serving.router import user_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "e2e-digits"
LAG = 3.0  # seconds a worker may take to follow an alias move (poll 0.2 s + load + check)
PACE = 0.003  # seconds the load waits after each answer: ~300 requests/s from two connections, not ~3,000


def _mlp(seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP().eval()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    reg = Registry(root / "registry", require_gate=True, user="e2e")
    example = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2, 3):
        reg.register(MODEL, _mlp(seed), example, onnx=False)  # served by torch here; ONNX: test_onnx_backend
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("e2e", MODEL, registry=reg.root, out_dir=root / "services", workers=2,
                 poll_interval=0.2)
    with start_service(d, timeout=90) as running:
        yield reg, running, d
    assert not running.alive()


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers  # names case-insensitive (sent lowercase)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def _paced_load(url: str, body: bytes, *, users: int, seconds: float) -> tuple[threading.Thread, dict]:
    """benchmarks/loadgen.py's ``run`` in a thread: two connections, ``users`` sticky users and as many
    anonymous requests, a new connection every 25 requests (so they land on either worker); its result
    lands in the returned dict under "result" when the thread ends.

    Paced: unpaced, two connections send ~3,000 requests/s and burn both cores (the 20,000-request cap of
    a plain loadgen run then ended the load seconds before the rollback). loadgen has no rate option; its
    check runs on every 200 answer, so a check that also waits PACE s paces the loop while the other
    connection's request is in flight: the workers still serve both at once, for the whole window."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import loadgen

    names = [f"user-{i}" for i in range(users)] + [None] * users
    reqs = [loadgen.build_request(url, body, {"X-Kit-User": u} if u else {}) for u in names]

    def answered(reply: bytes) -> bool:  # an answer with outputs (else a 599: a failure), then the pause
        time.sleep(PACE)
        return b'"outputs"' in reply

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=loadgen.run(
        url, reqs, concurrency=2, duration=seconds, users=names, check=answered, reconnect_every=25)), daemon=True)
    thread.start()
    return thread, out


def test_generated_service_passes_check_config(svc):
    _, running, d = svc
    res = check_config(d)
    assert res.returncode == 0
    assert (d / "start.sh").stat().st_mode & 0o111


def test_promote_canary_rollback_under_load(svc):
    reg, running, _ = svc
    body = json.dumps({"inputs": [[0.5] * 64]}).encode()
    load, out = _paced_load(running.url + "/predict", body, users=40, seconds=14)
    events = [(time.perf_counter(), {1})]
    time.sleep(1.5)
    reg.promote(MODEL, 2, force=True, why="test")
    events.append((time.perf_counter(), {2}))
    wait_all_workers(running.url, lambda b: b["production"]["version"] == 2)
    time.sleep(1.0)
    reg.set_canary(MODEL, 3, 0.25, force=True, why="test")
    t_canary = time.perf_counter()
    events.append((t_canary, {2, 3}))
    wait_all_workers(running.url, lambda b: b["canary"] and b["canary"]["version"] == 3)
    t_canary_stable = time.perf_counter()
    time.sleep(5.0)
    t_rollback = time.perf_counter()
    reg.rollback(MODEL, why="test")
    events.append((t_rollback, {1}))
    wait_all_workers(running.url, lambda b: b["production"]["version"] == 1 and b["canary"] is None)
    load.join(30)
    assert not load.is_alive() and "result" in out, "the load did not finish"
    result = out["result"]
    records = result.records
    assert records[-1][0] > t_rollback, "the load must run through the rollback"
    assert len(records) > 300, result.summary()
    # zero failed requests
    assert result.errors == [] and result.summary()["failed"] == 0, result.summary()
    assert all(r[2] == 200 for r in records)

    # every response from a version that was (or just stopped being) in the aliases when it was sent
    bad = unexpected_versions(records, events, LAG)
    assert not bad, f"{len(bad)} responses from unexpected versions, e.g. {bad[:3]}"

    # while the canary ran, on every worker: sticky users always on the version their hash says,
    # anonymous requests split 25/75 within a stated tolerance
    window = [r for r in records if t_canary_stable <= r[0] and r[0] + r[1] <= t_rollback]
    users = {}
    for _, _, _, version, user in window:
        if user is not None:
            users.setdefault(user, set()).add(int(version))
    assert len(users) == 40
    for user, versions in users.items():
        expect = 3 if user_bucket(MODEL, user) < 0.25 else 2
        assert versions == {expect}, (user, versions)
    anon = [int(r[3]) for r in window if r[4] is None]
    n = len(anon)
    assert n >= 200, n
    share = sum(v == 3 for v in anon) / n
    tol = 4 * (0.25 * 0.75 / n) ** 0.5  # 4 standard deviations of a binomial share: a false alarm < 1e-4
    assert abs(share - 0.25) <= tol, f"canary share {share:.3f} of {n} requests, tolerance {tol:.3f}"

    # metrics agree across the two workers: every request above was counted exactly once
    text = urllib.request.urlopen(running.url + "/metrics", timeout=10).read().decode()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("kit_requests_total{") and 'code="200"' in line)
    assert counted >= len(records), (counted, len(records))
    assert counted <= len(records) + 5  # the few probes other tests in this module may have sent
    lines = [json.loads(line) for line in running.logs().splitlines()
             if line.startswith("{") and '"path":"/predict"' in line]
    assert len({d["pid"] for d in lines}) == 2, "both workers should have served requests"
    # one whole JSON line per request (lines are written per event-loop pass: none lost or interleaved)
    ok = [d for d in lines if d["status"] == 200]
    assert len(records) <= len(ok) <= len(records) + 5, (len(ok), len(records))
    assert len({d["request_id"] for d in ok}) == len(ok), "request ids must be unique"
    assert all(d["logger"] == "kit.serving.access" and d["msg"] == "request" and d["latency_ms"] > 0
               and d["version"] in (1, 2, 3) and d["ts"].endswith("Z") for d in ok)


def test_failed_reload_keeps_the_old_model_serving(svc):
    reg, running, _ = svc
    before = _post(running.url + "/predict", {"inputs": [[0.25] * 64]})
    assert before[0] == 200
    serving = before[1]["model_version"]
    mv = reg.register(MODEL, _mlp(4), torch.rand(2, 64), onnx=False)
    with open(mv.path / "model.pt2", "r+b") as f:  # corrupt the artifact after registration
        f.seek(200)
        f.write(b"\0garbage\0")
    # promote refuses it, forced or not (forcing overrides the gate, never integrity); someone who can write
    # the registry moves the alias by hand instead
    with pytest.raises(IntegrityError, match="never integrity"):
        reg.promote(MODEL, mv.version, force=True, why="test")
    cur = reg.aliases(MODEL)
    atomic_write_json(reg.aliases_path(MODEL), dataclasses.replace(
        cur, production=mv.version, previous=(*cur.previous, cur.production), serial=cur.serial + 1).to_json())
    wait_all_workers(running.url, lambda b: b["reload_error"] is not None)
    status, body = get_json(running.url + "/readyz")
    assert status == 200 and "IntegrityError" in body["reload_error"]["error"]
    assert body["production"]["version"] == serving and body["status"].startswith("degraded")
    for _ in range(20):
        code, out, headers = _post(running.url + "/predict", {"inputs": [[0.25] * 64]})
        assert code == 200 and out["model_version"] == serving and headers["X-Kit-Model-Version"] == str(serving)
        assert out["outputs"] == before[1]["outputs"]
    text = urllib.request.urlopen(running.url + "/metrics", timeout=10).read().decode()
    assert any(line.startswith("kit_reloads_total{") and 'result="failure"' in line and not line.endswith(" 0.0")
               for line in text.splitlines())
    assert "reload failed, still serving" in running.logs() or "still serving" in body["status"] + str(body["reload_error"])
    reg.repair_aliases(MODEL)  # aliases.json back to the newest move record (a loadable version): the error clears
    wait_all_workers(running.url, lambda b: b["reload_error"] is None)


def test_tritonclient_against_the_v2_endpoints(svc):
    import tritonclient.http as httpclient

    reg, running, _ = svc
    client = httpclient.InferenceServerClient(url=running.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL)
        assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, 64]
        x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
        version = int(meta["versions"][0])
        expect = reg.load(MODEL, version).module(torch.from_numpy(x)).detach().numpy()
        for binary in (True, False):
            inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [httpclient.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)]
            res = client.infer(MODEL, [inp], outputs=outs, headers={"X-Kit-Version": str(version)})
            got = res.as_numpy(meta["outputs"][0]["name"])
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
            assert res.get_response()["model_version"] == str(version)
        res = client.infer(MODEL, [inp])  # no outputs named: the client asks for binary outputs
        assert res.as_numpy(meta["outputs"][0]["name"]).shape == (5, 10)
    finally:
        client.close()
