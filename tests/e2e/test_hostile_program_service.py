"""Issue 17, classes 1 and 2, against real gunicorn workers: a program whose graph name is Python (which
ran a shell command in every worker before) and one that asks ``aten.full`` for 4 GiB are refused on hot
reload; the workers keep serving the good version, /readyz says why, and the payload never runs.

Signatures are off, as in test_unsafe_artifacts.py: the rule holds below them (a trusted key vouches for
who made a model, not for what its program does).
"""

from __future__ import annotations

import json
import time
import urllib.request

import crafted_artifacts as ca
import pytest
import torch
from kit_testing import get_json, wait_all_workers

from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "hostile"


def _reload_error(url: str, version: int) -> dict:
    """The /readyz of a worker that tried ``version`` and refused it; every answer meanwhile serves 1."""
    deadline = time.monotonic() + 20
    _, body = get_json(url + "/readyz")
    while time.monotonic() < deadline and f"@{version}" not in str((body.get("reload_error") or {}).get("error")):
        assert body["production"]["version"] == 1, body
        time.sleep(0.2)
        _, body = get_json(url + "/readyz")
    return body


def test_workers_refuse_hostile_programs_and_keep_serving(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=False, user="t", keyring=None)  # sha256 only: below signatures
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    for _ in range(3):
        reg.register(MODEL, model, torch.randn(3, 6))
    marker = tmp_path / "PWNED"
    ca.plant(reg, MODEL, 2, ca.python_name(marker, "input"))
    ca.plant(reg, MODEL, 3, ca.full_of([1 << 15, 1 << 15]))
    reg.promote(MODEL, 1)
    d = generate("hostile", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=2, poll_interval=0.2)
    with start_service(d, timeout=90) as running:
        wait_all_workers(running.url, lambda b: (b.get("production") or {}).get("version") == 1)
        for version, why in ((2, "not a plain identifier"), (3, "max_tensor_bytes")):
            reg.promote(MODEL, version, force=True, why="attacker")
            body = _reload_error(running.url, version)
            assert body["status"].startswith("degraded") and body["production"]["version"] == 1, body
            assert "UnsafeArtifactError" in body["reload_error"]["error"] and why in body["reload_error"]["error"]
            req = urllib.request.Request(running.url + "/predict", data=json.dumps({"inputs": [[0.1] * 6]}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:  # still answered, by version 1
                assert json.loads(r.read())["model_version"] == 1
        logs = running.logs()
    assert "not a plain identifier" in logs and "max_tensor_bytes" in logs
    assert not marker.exists(), "a name from the artifact ran as Python in a worker"
