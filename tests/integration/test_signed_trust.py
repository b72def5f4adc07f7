"""Signatures where they are enforced: a real gate run (papermill) and a service (the ASGI app, through its
test client) refuse what an attacker who can write the registry, but lacks the key, puts there.

The attacker here edits files in the registry folder directly, as one with write access to a file share
would: re-hashes meta.json after changing an artifact, registers with a key of their own, moves aliases.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from kit_testing import write_validation_notebook

from kit import gate
from kit._io import atomic_write_json, sha256_file
from kit.demo import DigitsMLP
from kit.errors import GateError
from kit.registry import Registry, artifact_digest
from kit.servicegen import generate
from kit.serving import load_service_config
from kit.serving.asgi import create_asgi_app
from kit.serving.testing import AsgiTestClient
from kit.signing import Keyring

MODEL = "signed-digits"


def _mlp(seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP().eval()


def _forge_copy(reg: Registry, src: int) -> int:
    """Copy version ``src`` to a new number with a changed example.npz, meta.json re-hashed, old .sig kept."""
    versions = reg.model_dir(MODEL) / "versions"
    new = max(int(p.name) for p in versions.iterdir()) + 1
    dst = versions / str(new)
    shutil.copytree(versions / str(src), dst, ignore=shutil.ignore_patterns("gates"))
    with np.load(dst / "example.npz", allow_pickle=False) as z:
        arrays = {k: (z[k] + 1.0 if z[k].dtype.kind == "f" else z[k]) for k in z.files}
    np.savez(dst / "example.npz", **arrays)
    meta = json.loads((dst / "meta.json").read_text())
    meta["version"] = new
    meta["files"] = {f: sha256_file(dst / f) for f in meta["files"]}
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    atomic_write_json(dst / "meta.json", meta)
    return new


def _point_production_at(reg: Registry, version: int) -> None:
    """A move record signed by the project's key that names ``version`` without the registry's checks: as
    if the version's files were altered after a key holder moved it. The service is the last check.
    (A registry writer without a key can no longer write aliases.json at all: tests/unit/test_signed_moves.py.)"""
    with reg.lock(MODEL):
        ml = reg.movelog(MODEL)
        head, cur = ml.base()
        after = dataclasses.replace(cur, production=version)
        ml.commit(head, "promote", after, reg.keyring.signer(), user="owner", why="test",
                  artifacts=reg._artifacts(MODEL, after, {}), relies_on={"force": "test"}, details={})


@pytest.fixture
def signed(tmp_path):
    ring = Keyring(tmp_path / "keys")
    reg = Registry(tmp_path / "registry", require_gate=True, user="owner", keyring=ring)
    ex = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    reg.register(MODEL, _mlp(1), ex, metrics={"accuracy": 0.97})
    return reg


def test_the_gate_signs_its_result_and_refuses_a_tampered_version_before_running(signed, tmp_path):
    nb = write_validation_notebook(tmp_path / "acc.ipynb")
    result = gate.run_gate(signed, MODEL, 1, notebooks=[nb], timeout=120)
    assert result.passed
    sig = json.loads((result.run_dir / "result.json.sig").read_text())
    assert sig["key_id"] == signed.keyring.signer().key_id
    assert signed.passing_gate(signed.get(MODEL, 1))["run_id"] == result.run_id
    signed.promote(MODEL, 1)
    forged = _forge_copy(signed, 1)
    # the copied gate evidence is not there, and a copied result would be bound to v1's bytes anyway
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(GateError, match=r"fails verification .*changed after it was signed"):
        gate.run_gate(signed, MODEL, forged, notebooks=[nb], timeout=120)
    assert not (signed.version_dir(MODEL, forged) / "gates").exists()  # refused before anything ran
    assert {p.name for p in tmp_path.iterdir()} == before


def test_a_service_refuses_forged_and_foreign_versions_and_keeps_serving(signed, tmp_path, caplog):
    signed.promote(MODEL, 1, force=True, why="test")
    svc = generate("svc", MODEL, registry=signed.root, out_dir=tmp_path / "services",
                   trusted_keys=signed.keyring.service_keys())
    cfg = load_service_config(svc)
    # public keys only, never a private one of the project (guard.key is the service's own narrow credential)
    assert not [p for p in svc.rglob("*") if p.suffix in (".pem", ".key") and p.name != "guard.key"]
    assert cfg.trusted_keys == (signed.keyring.signer().public.text(),)
    app = create_asgi_app(cfg, watch=False)
    client = AsgiTestClient(app)
    try:
        _refusals(signed, app, client, tmp_path)
    finally:
        _close(app, client)


def _close(app, client) -> None:
    client.close()
    client.loop.close()
    app.close()


def _refusals(signed: Registry, app, client, tmp_path) -> None:
    slots = app.service.slots  # the ModelSlots (the watcher is off: refresh by hand)
    ready = client.get("/readyz").get_json()
    assert ready["production"]["version"] == 1
    assert ready["production"]["signed_by"] == signed.keyring.signer().key_id

    # 1. a re-hashed copy (no key): refused, v1 keeps serving, /readyz names the key and the cause
    forged = _forge_copy(signed, 1)
    _point_production_at(signed, forged)
    slots.refresh(force=True)
    body = client.get("/readyz").get_json()
    assert body["production"]["version"] == 1 and body["status"].startswith("degraded")
    assert "SignatureError" in body["reload_error"]["error"]
    assert "changed after it was signed" in body["reload_error"]["error"]
    assert signed.keyring.signer().key_id in body["reload_error"]["error"]

    # 2. a version signed by a key the service does not trust: refused, naming that key
    attacker = Registry(signed.root, keyring=Keyring(tmp_path / "attacker-keys"))
    foreign = attacker.register(MODEL, _mlp(2), torch.rand(2, 64))
    _point_production_at(signed, foreign.version)
    slots.refresh(force=True)
    body = client.get("/readyz").get_json()
    bad_id = attacker.keyring.signer().key_id
    assert body["production"]["version"] == 1
    assert f"signed by key {bad_id}, which is not trusted here" in body["reload_error"]["error"]

    # 3. an unsigned version (the .sig removed): refused
    (signed.version_dir(MODEL, foreign.version) / "meta.json.sig").unlink()
    slots.refresh(force=True)
    assert "is not signed" in client.get("/readyz").get_json()["reload_error"]["error"]

    # 4. a signed version copied unchanged to a new number (a replay; its signature verifies): refused,
    # naming the place it was signed for
    versions = signed.model_dir(MODEL) / "versions"
    replay = max(int(p.name) for p in versions.iterdir()) + 1
    shutil.copytree(versions / "1", versions / str(replay), ignore=shutil.ignore_patterns("gates"))
    _point_production_at(signed, replay)
    slots.refresh(force=True)
    body = client.get("/readyz").get_json()
    assert body["production"]["version"] == 1
    assert f"signed for {MODEL}@1 but sits at {MODEL}@{replay}" in body["reload_error"]["error"]

    # 5. promoting a properly signed version is followed
    good = signed.register(MODEL, _mlp(3), torch.rand(2, 64))
    _point_production_at(signed, good.version)
    slots.refresh(force=True)
    body = client.get("/readyz").get_json()
    assert body["production"]["version"] == good.version and body["status"] == "ok"


def test_a_service_without_trusted_keys_says_it_checks_no_signatures(signed, tmp_path, caplog):
    signed.promote(MODEL, 1, force=True, why="test")
    svc = generate("plain", MODEL, registry=signed.root, out_dir=tmp_path / "services")
    with caplog.at_level(logging.WARNING, logger="kit.serving.config"):
        app = create_asgi_app(load_service_config(svc), watch=False)
    assert "NOT signature-checked" in caplog.text
    client = AsgiTestClient(app)
    try:
        assert client.get("/readyz").status_code == 200
    finally:
        _close(app, client)
