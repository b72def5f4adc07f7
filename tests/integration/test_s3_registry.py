"""A registry in a real S3 server on 127.0.0.1 (the ``s3_server`` fixture: SeaweedFS, or moto's model of AWS S3
under ``make test-s3-compat``): register, verify, load, move and poll through ``Registry("s3://bucket/prefix")``,
hostile objects refused, and 8 writers on two "hosts" numbering versions and moving aliases at once without a
lock."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from kit.errors import ConfigError, IntegrityError, PromotionRefusedError, RegistryCorruptError, SignatureError
from kit.registry import ObjectRegistry, Registry
from kit.registry.storage import NOT_MODIFIED

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def url(s3_env) -> str:
    return f"s3://kit-test/t-{uuid.uuid4().hex[:10]}"


def _tiny(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(1, 4),)


def test_round_trip_register_verify_promote_load(url: str, keyring, tmp_path: Path):
    reg = Registry(url, keyring=keyring, user="alice", cache_dir=tmp_path / "cache-a")
    assert isinstance(reg, ObjectRegistry) and repr(reg) == f"Registry({url!r})"
    model, example = _tiny()
    said: list[str] = []
    mv = reg.register("tiny", model, example, onnx=False, progress=said.append)
    assert (mv.version, reg.models(), [v.version for v in reg.versions("tiny")]) == (1, ["tiny"], [1])
    ended = [ln.split(":")[0].strip() for ln in said if not ln.startswith("  …")]
    assert ended == ["torch.export", "parity", "save", "hash", "upload", "publish"], said
    assert mv.capture["steps"]["upload"] >= 0  # the upload's seconds are in the meta.json written after it
    assert reg.register("tiny", *_tiny(1), onnx=False).version == 2
    [ok1, ok2] = reg.verify("tiny")
    assert ok1.ok and ok2.ok and ok1.signed_by == keyring.signer().key_id

    a = reg.promote("tiny", 1, force=True, why="first")
    assert (a.production, a.serial) == (1, 1)
    # a second "host": its own cache and mirror, the same bucket; it sees the move and loads the version
    other = Registry(url, keyring=keyring, user="bob", cache_dir=tmp_path / "cache-b")
    assert other.aliases("tiny").production == 1
    lm = other.load("tiny", "production")
    assert lm.files_dir is not None and tmp_path / "cache-b" in lm.files_dir.parents
    torch.testing.assert_close(lm.module(*example), model(*example))
    other.set_canary("tiny", 2, 0.25, force=True, why="try v2")
    assert reg.aliases("tiny").canary == 2  # the first host follows the second's move
    reg.rollback("tiny", why="back") if reg.aliases("tiny").previous else reg.end_canary("tiny", why="end")
    events = [e["event"] for e in other.history("tiny")]
    assert events.count("register") == 2 and events[-2:] == ["canary", "canary_end"]
    assert all(e.get("verified", True) for e in other.history("tiny"))


def test_alias_poll_is_a_conditional_get(url: str, keyring, tmp_path: Path):
    reg = Registry(url, keyring=keyring, cache_dir=tmp_path / "c")
    reg.register("tiny", *_tiny(), onnx=False)
    reg.promote("tiny", 1, force=True, why="x")
    st = reg.storage
    got = st.get("tiny/aliases.json", 1 << 20)
    assert got is not None
    assert st.get_if_changed("tiny/aliases.json", got.etag, 1 << 20) is NOT_MODIFIED
    reg.register("tiny", *_tiny(1), onnx=False)
    reg.promote("tiny", 2, force=True, why="y")
    changed = st.get_if_changed("tiny/aliases.json", got.etag, 1 << 20)
    assert changed is not NOT_MODIFIED and changed is not None and changed.data != got.data


def test_a_swapped_object_is_refused_on_load(url: str, keyring, tmp_path: Path):
    reg = Registry(url, keyring=keyring, cache_dir=tmp_path / "c1")
    reg.register("tiny", *_tiny(), onnx=False)
    reg.storage.put("tiny/versions/1/example.npz", b"not the registered bytes")  # someone with bucket access
    fresh = Registry(url, keyring=keyring, cache_dir=tmp_path / "c2")
    with pytest.raises(IntegrityError, match="sha256"):
        fresh.load("tiny", 1)
    [res] = fresh.verify("tiny")
    assert not res.ok and "example.npz" in res.problems[0]
    assert not list((tmp_path / "c2").glob("[0-9a-f]*"))  # nothing half-made is left to be trusted


def test_an_oversized_record_is_refused_before_it_is_read(url: str, keyring, tmp_path: Path):
    reg = Registry(url, keyring=keyring, cache_dir=tmp_path / "c")
    reg.register("tiny", *_tiny(), onnx=False)
    reg.storage.put("tiny/aliases.json", b"x" * (300 << 10))
    with pytest.raises(RegistryCorruptError, match="over"):
        reg.aliases("tiny")


def test_a_bucket_writer_without_a_key_moves_nothing(url: str, keyring, tmp_path: Path):
    """Anyone who can write the bucket can add objects; without a trusted key they neither pass a gate nor
    move traffic: a forged passing result.json and a forged aliases.json are refused like in a folder."""
    from kit.registry.moves import canonical, envelope
    from kit.signing import KeyStore

    reg = Registry(url, keyring=keyring, cache_dir=tmp_path / "c")
    mv = reg.register("tiny", *_tiny(), onnx=False)
    reg.register("tiny", *_tiny(1), onnx=False)
    forged_gate = {"run_id": "r1", "passed": True, "artifact_sha256": mv.artifact_sha256}
    reg.storage.put("tiny/versions/1/gates/r1/result.json", json.dumps(forged_gate).encode())
    with pytest.raises(PromotionRefusedError, match="no passing gate"):
        reg.promote("tiny", 1)
    assert reg.gate_verdict(reg.get("tiny", 1))[0] == "unsigned"  # synced from the bucket, not counted

    reg.promote("tiny", 1, force=True, why="first")
    rec = json.loads(json.loads(reg.storage.get("tiny/aliases.json", 1 << 20).data)["record"])
    attacker = KeyStore(tmp_path / "attacker").new()
    forged = {**rec, "serial": 2, "prev_sha256": hashlib.sha256(canonical(rec)).hexdigest(),
              "state": {**rec["state"], "production": 2, "previous": [1]}}
    reg.storage.put("tiny/aliases.json", envelope(forged, attacker))
    fresh = Registry(url, keyring=keyring, cache_dir=tmp_path / "c2")
    with pytest.raises(SignatureError, match="not trusted"):
        fresh.aliases("tiny")


def test_bad_urls_and_keys_are_refused(s3_env):
    for bad in ("s3://", "s3://Bad_Bucket/x", "s3://bucket/../x", "gs://bucket/x"):
        with pytest.raises(ConfigError, match="s3://bucket/prefix"):
            Registry(bad)
    reg = Registry("s3://kit-test/keys")
    with pytest.raises(RegistryCorruptError, match="plain relative"):
        reg.storage.get("../outside", 10)


WRITERS = Path(__file__).with_name("registry_child.py")


def test_eight_writers_on_two_hosts_never_lose_or_double(url: str, tmp_path: Path):
    """Two "hosts" (own cache and mirror folders), four writer processes each, released together, registering
    and promoting at once. A host is one launcher process that pays torch's import and captures once, then
    forks its four writers (tests/integration/registry_child.py)."""
    hosts = []
    for h in range(2):
        env = {**os.environ, "KIT_CACHE_DIR": str(tmp_path / f"host{h}" / "cache"),
               "KIT_KEYS_DIR": str(tmp_path / f"host{h}" / "keys")}
        names = ",".join(f"w{i}" for i in range(h, 8, 2))
        hosts.append(subprocess.Popen([sys.executable, str(WRITERS), url, "--name", "shared", "--writers", names,
                                       "--moves", "3", "--unsigned"], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in hosts:  # every writer of both hosts forked and held at its host's barrier
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    for p in hosts:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in hosts:
        out, err = p.communicate(timeout=500)
        assert p.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines()]
    assert len({r["pid"] for r in results}) == 8, "eight writer processes"
    versions = sorted(v for r in results for v in r["versions"])
    assert versions == list(range(1, 9))  # unique and dense
    serials = sorted(s for r in results for s in r["serials"])
    assert serials == list(range(1, 25))  # every move recorded exactly once, none lost
    reg = Registry(url, require_gate=False, keyring=None)
    moves = [e for e in reg.history("shared") if e["event"] == "promote"]
    assert [m["serial"] for m in moves] == list(range(1, 25)) and all(m["verified"] for m in moves)
    by_serial = {s: r["who"] for r in results for s in r["serials"]}
    assert all(m["why"].startswith(by_serial[m["serial"]] + " ") for m in moves)  # each one its writer's
    assert reg.aliases("shared").serial == 24


def test_a_service_generated_from_a_bucket_registry_names_the_bucket_not_the_mirror(url: str, keyring, tmp_path):
    """deploy(service=...) and the demo pass `registry.location` to generate(): a remote registry's root is
    this host's mirror, which no other host has."""
    from kit.service_settings import read_service_toml
    from kit.servicegen import generate

    reg = Registry(url, keyring=keyring, user="alice", cache_dir=tmp_path / "cache")
    assert reg.location == url and str(reg.root) != url
    reg.register("tiny", *_tiny(), onnx=False)
    out = generate("tinysvc", "tiny", registry=reg.location, out_dir=tmp_path / "services")
    assert read_service_toml(out)["model"]["registry"] == url


def test_a_cache_fill_from_the_bucket_is_fsyncd_only_where_no_boot_id_can_be_read(url: str, keyring, tmp_path: Path,
                                                                                   monkeypatch):
    """The verified cache's downloads are left to the kernel when its seal can name the boot
    (kit.registry.cache); where it cannot, they are fsync'd as every other download is."""
    from kit.registry import cache as cache_mod

    mv = Registry(url, keyring=keyring, cache_dir=tmp_path / "writer").register("tiny", *_tiny(), onnx=False)
    synced: set[int] = set()
    for name in ("fsync", "fdatasync"):
        def sync(fd: int, real=getattr(os, name)) -> None:
            synced.add(os.fstat(fd).st_ino)
            real(fd)

        monkeypatch.setattr(os, name, sync)
    for boot in ("boot-a", None):
        monkeypatch.setattr(cache_mod, "boot_id", lambda boot=boot: boot)
        synced.clear()
        host = Registry(url, keyring=keyring, cache_dir=tmp_path / f"host-{boot}")
        host.load("tiny", 1)
        (entry,) = host.cache.entries()
        files = {(entry / f).stat().st_ino for f in mv.files}
        assert (files <= synced) if boot is None else not files & synced, (boot, files, synced)
        assert json.loads((entry / ".sealed").read_bytes()).get("boot_id") == boot
