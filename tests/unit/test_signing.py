"""kit.signing and the registry's signatures: an attacker who can write the registry but lacks the key."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

from kit._io import atomic_write_json, sha256_file
from kit.errors import IntegrityError, PromotionRefusedError, SignatureError, SigningKeyError
from kit.registry import Registry, artifact_digest
from kit.signing import Keyring, KeyStore, PublicKey, Trust, sig_path, sign_file, verify_file


def _small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3))


@pytest.fixture
def ring(tmp_path) -> Keyring:
    return Keyring(tmp_path / "keys")


@pytest.fixture
def reg(tmp_path, ring) -> Registry:
    return Registry(tmp_path / "reg", user="alice", keyring=ring)


def _rehash(mv) -> None:
    """What an attacker with write access to the registry (and no key) does after editing files."""
    meta_path = mv.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {f: sha256_file(mv.path / f) for f in meta["files"]}
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    atomic_write_json(meta_path, meta)


def _swap_reference(mv) -> None:
    """Replace the stored example's reference output (a stand-in for crafted weights) and re-hash."""
    p = mv.path / "example.npz"
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for k in arrays:
        if arrays[k].dtype.kind == "f":
            arrays[k] = arrays[k] + 1.0
    np.savez(p, **arrays)
    _rehash(mv)


def test_key_pair_on_disk_private_key_0600_and_ids(tmp_path):
    store = KeyStore(tmp_path / "keys")
    key = store.new()
    assert key.key_id == key.public.key_id and len(key.key_id) == 16
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    assert store.default_id() == key.key_id and store.key_ids() == [key.key_id]
    assert PublicKey.from_text(key.public.text()) == key.public
    sig = key.sign(b"data")
    assert key.public.verify(sig, b"data") and not key.public.verify(sig, b"datA")
    with pytest.raises(SigningKeyError, match="not an Ed25519 public key"):
        PublicKey.from_text("ed25519:AAAA")


def test_register_makes_a_key_on_first_use_and_signs_meta(reg, ring, caplog):
    assert ring.store is not None and ring.store.key_ids() == []
    with caplog.at_level("WARNING", logger="kit.signing"):
        mv = reg.register("m", _small(), torch.randn(2, 4))
    assert ring.created is not None and "made a signing key" in caplog.text
    assert sig_path(mv.path / "meta.json").is_file()
    (res,) = reg.verify("m", 1)
    assert res.ok and res.signed_by == ring.created.key_id
    loaded = reg.load("m", 1)
    assert loaded.signed_by == ring.created.key_id
    # the private key is never in the registry
    assert not [p for p in reg.root.rglob("*") if p.suffix == ".pem"]


def test_tampered_meta_rehashed_without_the_key_is_refused_everywhere(reg):
    mv = reg.register("m", _small(), torch.randn(2, 4))
    reg.promote("m", 1, force=True, why="first")
    _swap_reference(mv)
    assert reg.verify("m", 1)[0].ok is False
    with pytest.raises(SignatureError, match=r"changed after it was signed.*kit keys sign m@1") as e:
        reg.load("m", 1)
    assert e.value.key_id is not None and e.value.key_id in str(e.value)
    with pytest.raises(SignatureError, match="forcing overrides the gate, never integrity"):
        reg.promote("m", 1, force=True, why="attacker")
    reg.register("m", _small(1), torch.randn(2, 4))
    with pytest.raises(SignatureError):
        reg.set_canary("m", 1, 0.5, force=True, why="x")


def test_a_plain_sha256_mismatch_is_still_an_integrity_error(reg):
    mv = reg.register("m", _small(), torch.randn(2, 4))
    with open(mv.path / "model.pt2", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="model.pt2: sha256"):
        reg.load("m", 1)
    with pytest.raises(IntegrityError, match="never integrity"):
        reg.promote("m", 1, force=True, why="x")


def test_unsigned_version_is_refused_with_the_fix(reg):
    mv = reg.register("m", _small(), torch.randn(2, 4))
    sig_path(mv.path / "meta.json").unlink()
    with pytest.raises(SignatureError, match=r"not signed \(meta.json.sig is missing\).*trusted keys: [0-9a-f]{16}"):
        reg.load("m", 1)
    # the key holder can re-sign a version after checking its files
    assert reg.sign_version("m", 1) == reg.keyring.signer().key_id
    assert reg.load("m", 1).signed_by is not None
    assert reg.history("m")[-1]["event"] == "sign"


def test_a_key_not_trusted_here_is_named(tmp_path, reg):
    other = Registry(reg.root, keyring=Keyring(tmp_path / "other-keys"))
    mv = other.register("m", _small(), torch.randn(2, 4))  # signed with another project's key
    other_id = other.keyring.signer().key_id
    # reg's keyring holds no key yet; it makes one when asked to sign, and trusts only that
    reg.keyring.signer()
    with pytest.raises(SignatureError, match=f"signed by key {other_id}, which is not trusted here") as e:
        reg.load("m", mv.version)
    assert e.value.key_id == other_id
    # trusting its public key (kit.toml trusted_keys, service.toml [trust]) admits it
    trusting = Registry(reg.root, keyring=Keyring(tmp_path / "keys", trusted=[other.keyring.signer().public.text()]))
    assert trusting.load("m", mv.version).signed_by == other_id


def test_verify_only_keyring_cannot_sign_and_checks_against_its_trust(tmp_path, reg):
    reg.register("m", _small(), torch.randn(2, 4))
    pub = reg.keyring.signer().public.text()
    service = Registry(reg.root, require_gate=False, keyring=Keyring.verify_only(Trust.from_texts([pub])))
    assert service.load("m", 1).signed_by == reg.keyring.signer().key_id
    with pytest.raises(SigningKeyError, match="only public keys"):
        service.keyring.signer()
    empty = Registry(reg.root, keyring=Keyring.verify_only(Trust()))
    with pytest.raises(SignatureError, match="trusted keys: none"):
        empty.load("m", 1)


def test_a_forged_gate_result_is_not_a_passing_gate(tmp_path, reg):
    mv = reg.register("m", _small(), torch.randn(2, 4))
    result = reg.gate_root("m", 1) / "forged" / "result.json"
    atomic_write_json(result, {"run_id": "forged", "passed": True, "artifact_sha256": mv.artifact_sha256})
    assert reg.passing_gate(mv) is None
    assert reg.gate_verdict(mv)[0] == "unsigned"
    with pytest.raises(PromotionRefusedError, match="no passing gate"):
        reg.promote("m", 1)
    # signed by the attacker's own key: still no gate
    sign_file(result, KeyStore(tmp_path / "attacker").new())
    assert reg.passing_gate(mv) is None
    # signed by the project key (what kit.gate does after writing result.json): a gate
    assert reg.sign_evidence(result) == reg.keyring.signer().key_id
    assert reg.passing_gate(mv) is not None and reg.gate_verdict(mv)[0] == "passed"
    reg.promote("m", 1)
    # and editing a signed result afterwards breaks it
    atomic_write_json(result, {"run_id": "forged", "passed": True, "artifact_sha256": mv.artifact_sha256, "x": 1})
    assert reg.passing_gate(mv) is None


def test_check_reference_says_what_a_mismatch_can_be(tmp_path, reg):
    mv = reg.register("m", _small(), torch.randn(2, 4))
    loaded = reg.load("m", 1)
    signed = dataclasses_replace_ref(loaded)
    with pytest.raises(IntegrityError, match="not tampered with: this environment computes differently"):
        signed.check_reference()
    # without signature checks, tampering cannot be ruled out, and the message says so
    unsigned_reg = Registry(reg.root, keyring=None)
    _swap_reference(mv)
    with pytest.raises(IntegrityError, match="replaced the weights and re-hashed meta.json, or this environment"):
        unsigned_reg.load("m", 1).check_reference()


def dataclasses_replace_ref(loaded):
    import dataclasses

    return dataclasses.replace(loaded, reference_outputs=tuple(r + 1 for r in loaded.reference_outputs))


def test_verify_file_direct(tmp_path):
    key = KeyStore(tmp_path / "k").new()
    f = tmp_path / "x.json"
    f.write_text("{}")
    sign_file(f, key)
    assert verify_file(f, Trust((key.public,)), "x", "fix it") == key.key_id
    sig_path(f).write_text("not json")
    with pytest.raises(SignatureError, match="unreadable"):
        verify_file(f, Trust((key.public,)), "x", "fix it")


def test_config_resolves_keys(tmp_path):
    from kit.config import load_config

    (tmp_path / "kit.toml").write_text('keys_dir = "keys"\ntrusted_keys = ["ed25519:' + "A" * 43 + '="]\n')
    cfg = load_config(tmp_path, environ={})
    assert cfg.keys_dir == tmp_path / "keys" and len(cfg.trusted_keys) == 1
    cfg = load_config(tmp_path, environ={"KIT_KEYS_DIR": str(tmp_path / "k2"), "KIT_SIGNING_KEY": "/x/y.pem"})
    assert cfg.keys_dir == tmp_path / "k2" and str(cfg.signing_key) == "/x/y.pem"
    assert load_config(tmp_path / "..", environ={"HOME": "/home/u"}).keys_dir is not None


def test_keys_commands_and_signing_an_old_version(tmp_path):
    from click.testing import CliRunner

    from kit.cli import cli

    env = {"KIT_KEYS_DIR": str(tmp_path / "keys")}

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    assert "No keys" in run("keys", "list").output
    made = json.loads(run("keys", "new", "--json").output)
    assert run("keys", "show").output.strip() == made["public_key"]
    assert run("keys", "show", "--pem").output.startswith("-----BEGIN PUBLIC KEY-----")
    assert made["key_id"] in run("keys", "list").output
    old = Registry(tmp_path / "reg", keyring=None)  # a registry written before signing: nothing signed
    old.register("m", _small(), torch.randn(2, 4))
    r = run("--registry", str(old.root), "verify")
    assert r.exit_code == 1 and "m@1 (its meta.json) is not signed" in r.output and "kit keys sign m@1" in r.output
    r = run("--registry", str(old.root), "promote", "m@1", "--force", "--why", "x")
    assert r.exit_code == 2 and "never integrity" in r.output
    assert f"with key {made['key_id']}" in run("--registry", str(old.root), "keys", "sign", "m@1").output
    r = run("--registry", str(old.root), "verify")
    assert r.exit_code == 0 and f"ok  m@1 (signed by {made['key_id']})" in r.output


def test_keys_inside_the_registry_are_refused(tmp_path):
    from kit.config import load_config
    from kit.errors import ConfigError

    (tmp_path / "kit.toml").write_text('registry = "registry"\nkeys_dir = "registry/keys"\n')
    with pytest.raises(ConfigError, match="inside the registry"):
        load_config(tmp_path, environ={}).keyring()
