"""Traffic capture in a real service (gunicorn, 2 workers) and `kit replay` over what it wrote.

The service captures every answered request (sample_rate 1.0) into a folder; `kit replay` (a real
subprocess) runs those requests through an identical version (full agreement, zero deviation) and through a
different one (disagreement found), and the request path was never blocked: every request answered 200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from kit_testing import project_keyring
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "captured"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_capture_then_replay(tmp_path: Path):
    reg = Registry(tmp_path / "registry", require_gate=False, user="e2e", keyring=project_keyring())
    for seed in (1, 1, 2):  # v2 is v1's twin, v3 another model
        reg.register(MODEL, _model(seed), torch.rand(2, 6))
    reg.promote(MODEL, 1, force=True, why="test")
    cap = tmp_path / "capture"
    d = generate("cap", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=2,
                 capture=True, capture_sample_rate=1.0, capture_folder=str(cap), capture_drop_inputs=())
    gen = torch.Generator().manual_seed(0)
    with start_service(d, timeout=90) as running:
        t0 = time.perf_counter()
        for i in range(60):
            rows = torch.rand(1 + i % 2, 6, generator=gen).tolist()
            req = urllib.request.Request(running.url + "/predict", data=json.dumps({"inputs": rows}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        took = time.perf_counter() - t0
        deadline = time.monotonic() + 10  # the writer threads are behind the requests, never in front
        while time.monotonic() < deadline and sum(len(p.read_text().splitlines()) for p in cap.glob("*.jsonl")) < 60:
            time.sleep(0.1)
    files = list(cap.glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in files) == 60
    assert cap.stat().st_mode & 0o777 == 0o700  # captured requests are user data (issue 17: files were 0644)
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    env = {**os.environ, "KIT_REGISTRY": str(reg.root)}
    kit = [str(Path(sys.executable).parent / "kit"), "replay"]
    t1 = time.perf_counter()
    same = subprocess.run([*kit, f"{MODEL}@2", "--capture", str(cap), "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    replay_s = time.perf_counter() - t1
    assert same.returncode == 0, same.stderr
    doc = json.loads(same.stdout)
    assert (doc["replayed"], doc["rows"], doc["agreement"], doc["errors"], doc["served"]) == (60, 90, 1.0, 0, {"1": 60})
    assert doc["max_deviation"] < 1e-5 and doc["mode"] == "argmax"
    other = subprocess.run([*kit, f"{MODEL}@3", "--capture", str(cap)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 0, other.stderr
    assert "agreement" in other.stdout and "100.00%" not in other.stdout.split("agreement")[1].splitlines()[0]
    print(f"60 requests with capture on in {took:.2f}s; `kit replay` of 60 records {replay_s:.2f}s "
          f"(candidate p50 {doc['candidate_ms']['p50']} ms, recorded p50 {doc['recorded_ms']['p50']} ms)")
