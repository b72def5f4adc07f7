"""Signed moves against real gunicorn workers (2) on 127.0.0.1: a service that trusts only the project's key
follows signed moves, and refuses a forged aliases.json and a replayed older record, keeping the state it
serves and saying why on /readyz. Also measures alias propagation (move -> every worker serves it)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
import torch
from kit_testing import get_json, wait_all_workers

from kit.demo import DigitsMLP
from kit.registry import Registry
from kit.registry.moves import MoveStorage, canonical, envelope
from kit.servicegen import generate, start_service
from kit.signing import Keyring, KeyStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "signed-moves"


def _mlp(seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP().eval()


def _predict_version(url: str) -> int:
    import urllib.request

    req = urllib.request.Request(url + "/predict", data=json.dumps({"inputs": [[0.25] * 64]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(json.loads(r.read())["model_version"])


def _serving(v: int):
    return lambda b: b["production"] is not None and b["production"]["version"] == v


def test_service_follows_signed_moves_and_refuses_forged_and_replayed_ones(tmp_path):
    keys = Keyring(tmp_path / "keys")
    reg = Registry(tmp_path / "registry", require_gate=True, user="e2e", keyring=keys)
    example = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2, 3):
        reg.register(MODEL, _mlp(seed), example)
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("signed", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=2, poll_interval=0.2,
                 trusted_keys=keys.service_keys())
    with start_service(d, timeout=90) as running:
        url = running.url
        assert _predict_version(url) == 1
        t0 = time.perf_counter()
        reg.promote(MODEL, 2, force=True, why="test")
        wait_all_workers(url, _serving(2))
        print(f"\nsigned alias propagation (promote -> every worker serves v2): {time.perf_counter() - t0:.2f} s")

        # 1. a registry writer without a key points production at v3 (whose gate never ran)
        good = reg.aliases_path(MODEL).read_bytes()
        rec = json.loads(json.loads(good)["record"])
        forged = {**rec, "serial": rec["serial"] + 1, "prev_sha256": hashlib.sha256(canonical(rec)).hexdigest(),
                  "state": {**rec["state"], "production": 3, "previous": [1, 2]}}
        attacker = KeyStore(tmp_path / "attacker").new()
        reg.aliases_path(MODEL).write_bytes(envelope(forged, attacker))
        wait_all_workers(url, lambda b: b["reload_error"] is not None)
        status, body = get_json(url + "/readyz")
        assert status == 200 and body["status"].startswith("degraded")
        assert f"signed by key {attacker.key_id}, which is not trusted" in body["reload_error"]["error"]
        assert body["production"]["version"] == 2
        assert {_predict_version(url) for _ in range(20)} == {2}

        # 2. the same state with no signature at all (the old format)
        reg.aliases_path(MODEL).write_text(json.dumps({"production": {"version": 3, "previous": [1, 2]}, "serial": 50}))
        time.sleep(1.0)
        assert "not a signed move record" in get_json(url + "/readyz")[1]["reload_error"]["error"]
        assert {_predict_version(url) for _ in range(10)} == {2}

        # 3. replay: the older, validly signed record (production v1) put back, the newer one hidden
        first = MoveStorage(reg.model_dir(MODEL)).read(1)
        newer = MoveStorage(reg.model_dir(MODEL)).path(2)
        shutil.move(str(newer), str(tmp_path / "hidden.json"))
        reg.aliases_path(MODEL).write_bytes(first)
        time.sleep(1.0)
        wait_all_workers(url, lambda b: "already followed serial 2" in (b["reload_error"] or {}).get("error", ""))
        assert {_predict_version(url) for _ in range(20)} == {2}

        # a key holder repairs: the newest valid record is copied back; the error clears
        shutil.move(str(tmp_path / "hidden.json"), str(newer))
        reg.repair_aliases(MODEL)
        wait_all_workers(url, lambda b: b["reload_error"] is None)
        t0 = time.perf_counter()
        reg.rollback(MODEL, why="test")
        wait_all_workers(url, _serving(1))
        print(f"signed alias propagation (rollback -> every worker serves v1): {time.perf_counter() - t0:.2f} s")
        assert _predict_version(url) == 1
    assert not running.alive()
