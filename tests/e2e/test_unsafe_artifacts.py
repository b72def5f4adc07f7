"""A crafted model.pt2 in the registry (meta.json re-hashed, as an attacker who can write the folder would)
runs nothing and loads nowhere: Registry.load, the gate, a real gunicorn service (first start and hot
reload) and `kit pack` all refuse it, naming the entry. Signatures (kit.signing) are off here on purpose:
this is the layer below them, for a registry without trusted keys or a key that leaked.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import crafted_artifacts as ca
import pytest
import torch
from kit_testing import wait_all_workers

from kit.errors import PackError, ServiceError, UnsafeArtifactError
from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "victim"


def _plant(reg: Registry, version: int, payload, marker) -> None:
    """Replace version's model.pt2 with a crafted one and re-hash meta.json so `kit verify` says ok."""
    ca.plant(reg, MODEL, version, payload(marker))
    assert all(r.ok for r in reg.verify(MODEL, version)), "the forgery passes sha256 verification"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("unsafe")
    reg = Registry(root / "registry", require_gate=True, user="attacker", keyring=None)  # signatures off (docstring)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    for _ in range(3):
        reg.register(MODEL, model, torch.randn(3, 6))
    marker = root / "pwned"
    _plant(reg, 2, ca.opaque_object, marker)
    _plant(reg, 3, ca.sample_inputs, marker)
    return root, reg, marker


def test_registry_load_refuses_and_nothing_runs(planted):
    _, reg, marker = planted
    reg.load(MODEL, 1)
    for v, entry in ((2, "opaque_obj_0"), (3, "sample_inputs")):
        with pytest.raises(UnsafeArtifactError, match=entry):
            reg.load(MODEL, v)
    assert not marker.exists()


def test_gate_fails_and_nothing_runs(planted):
    from kit.gate import run_gate

    _, reg, marker = planted
    result = run_gate(reg, MODEL, 2)
    assert not result.passed
    assert "UnsafeArtifactError" in result.error and "opaque_obj_0" in result.error  # the notebook's load refused
    assert not marker.exists()


def _readyz(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def test_service_never_ready_on_a_crafted_production(planted):
    root, reg, marker = planted
    reg.promote(MODEL, 2, force=True, why="attacker")
    d = generate("victim-a", MODEL, registry=reg.root, out_dir=root / "services", workers=2, poll_interval=0.2)
    with pytest.raises(ServiceError) as err:
        start_service(d, timeout=20).stop()
    assert "opaque_obj_0" in str(err.value) or "UnsafeArtifactError" in str(err.value)
    assert not marker.exists()


def test_service_stays_on_the_old_version_on_reload(planted):
    root, reg, marker = planted
    reg.promote(MODEL, 1, force=True, why="good")
    d = generate("victim-b", MODEL, registry=reg.root, out_dir=root / "services", workers=2, poll_interval=0.2)
    with start_service(d, timeout=90) as running:
        # start_service returns once one worker is ready: the other must serve version 1 too before the
        # attacker's promotion, or it starts on the crafted version and is (rightly) never ready
        wait_all_workers(running.url, lambda b: (b.get("production") or {}).get("version") == 1)
        reg.promote(MODEL, 3, force=True, why="attacker")
        # /readyz is answered by either of the 2 workers, each reloading on its own: judge the answer of
        # one that has tried the crafted version (the other may not have yet), and every answer meanwhile
        deadline = time.monotonic() + 20
        body = _readyz(running.url)
        while time.monotonic() < deadline and (body.get("reload_error") or {}).get("error") is None:
            assert body["production"]["version"] == 1, body
            time.sleep(0.2)
            body = _readyz(running.url)
        assert body["status"].startswith("degraded") and body["production"]["version"] == 1
        assert "UnsafeArtifactError" in body["reload_error"]["error"] and "sample_inputs" in body["reload_error"]["error"]
        assert "sample_inputs" in running.logs()
    assert not marker.exists()


def test_pack_refuses_before_packing(planted, tmp_path):
    from kit.pack import pack

    root, reg, marker = planted
    reg.promote(MODEL, 2, force=True, why="attacker")
    d = generate("victim-c", MODEL, registry=reg.root, out_dir=root / "services")
    with pytest.raises(PackError, match="victim@2 will not be shipped.*opaque_obj_0"):
        pack(d, out_dir=tmp_path / "dist", registry=reg.root)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").glob("*.tar*"))
    assert not marker.exists()
    shutil.rmtree(d)
