"""kit.registry: versions, aliases, gates, audit, verification and refusals (in one process)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kit._io import atomic_write_json
from kit.errors import (
    IntegrityError,
    InvalidNameError,
    ModelNotFoundError,
    PromotionRefusedError,
    RegistryCorruptError,
    VersionNotFoundError,
)
from kit.registry import Registry, artifact_digest, parse_ref


def _small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3))


def _pass_gate(reg: Registry, mv, run_id: str = "r1", passed: bool = True, sha: str | None = None) -> None:
    """Write a gate result the way kit.gate does (the gate itself is tested in tests/integration)."""
    atomic_write_json(reg.gate_root(mv.name, mv.version) / run_id / "result.json",
                      {"run_id": run_id, "passed": passed, "artifact_sha256": sha or mv.artifact_sha256})


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg", user="alice", keyring=None)  # unsigned: gate results written by hand


def test_register_writes_immutable_layout(reg, tmp_path):
    mv = reg.register("m", _small(), torch.randn(2, 4), metrics={"acc": 0.5}, tags={"team": "x"},
                      source={"kind": "script", "path": "train.py"})
    assert mv.version == 1 and mv.ref == "m@1"
    assert sorted(p.name for p in mv.path.iterdir()) == ["example.npz", "meta.json", "model.onnx", "model.pt2"]
    meta = json.loads((mv.path / "meta.json").read_text())
    assert meta["schema"] == 1 and meta["version"] == 1
    assert set(meta["files"]) == {"model.pt2", "example.npz", "model.onnx"} and meta["capture"]["onnx"]["exported"]
    assert meta["artifact_sha256"] == artifact_digest(meta["files"])
    assert meta["signature"]["inputs"][0]["shape"] == ["batch", 4]
    assert meta["env"]["torch"].startswith("2.") and meta["env"]["python"]
    assert meta["created"].endswith("Z")
    assert meta["metrics"] == {"acc": 0.5} and meta["tags"] == {"team": "x"}
    assert not list((tmp_path / "reg" / "m").glob(".tmp-*"))
    mv2 = reg.register("m", _small(1), torch.randn(2, 4))
    assert mv2.version == 2 and [v.version for v in reg.versions("m")] == [1, 2]
    ev = reg.history("m")
    assert [e["event"] for e in ev] == ["register", "register"] and ev[0]["user"] == "alice"


def test_detected_source_has_git_commit_when_in_a_repo(reg, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    mv = reg.register("m", _small(), torch.randn(1, 4))
    assert mv.source["kind"] in ("script", "notebook")
    if (repo_root / ".git").exists():
        assert len(mv.source.get("git_commit", "")) == 40


def test_get_by_number_alias_latest_and_errors(reg):
    for s in range(3):
        reg.register("m", _small(s), torch.randn(1, 4))
    assert reg.get("m").version == 3  # no production yet: latest
    assert reg.get("m", "2").version == 2 and reg.resolve("m@latest").version == 3
    with pytest.raises(VersionNotFoundError, match=r"has no version 9 \(have 1-3\)"):
        reg.get("m", 9)
    with pytest.raises(VersionNotFoundError, match="no production version"):
        reg.get("m", "production")
    with pytest.raises(ModelNotFoundError, match="No model 'nope'"):
        reg.get("nope")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".hidden", "", "x" * 65, "a\0b", "a b", "/abs"])
def test_path_traversal_names_are_refused(reg, bad):
    with pytest.raises(InvalidNameError):
        reg.register(bad, _small(), torch.randn(1, 4))
    with pytest.raises(InvalidNameError):
        reg.get(bad)
    assert not (reg.root.parent / "etc").exists()


@pytest.mark.parametrize("bad", ["../1", "0", "-1", "1.5", "1/../../x", "latest2", True])
def test_bad_versions_are_refused(reg, bad):
    reg.register("m", _small(), torch.randn(1, 4))
    with pytest.raises(InvalidNameError):
        reg.get("m", bad)
    with pytest.raises(InvalidNameError):
        parse_ref(f"m@{bad}")


def test_promotion_needs_a_passing_gate_for_this_artifact(reg):
    v1 = reg.register("m", _small(0), torch.randn(1, 4))
    with pytest.raises(PromotionRefusedError, match="Validate it first") as e:
        reg.promote("m", 1)
    assert (e.value.remedy, e.value.subject) == ("validate", "m@1")  # each shell words the hint itself
    _pass_gate(reg, v1, passed=False)
    with pytest.raises(PromotionRefusedError):
        reg.promote("m", 1)
    _pass_gate(reg, v1, run_id="r2", sha="0" * 64)  # passed, but for another artifact
    with pytest.raises(PromotionRefusedError):
        reg.promote("m", 1)
    _pass_gate(reg, v1, run_id="r3")
    a = reg.promote("m", 1)
    assert a.production == 1 and reg.history("m")[-1]["gate"] == "r3"
    record = json.loads(json.loads(reg.aliases_path("m").read_text())["record"])  # a copy of the move record
    assert record["state"]["production"] == 1 and record["relies_on"]["gate"]["run_id"] == "r3"


def test_forced_promotion_needs_a_reason_and_is_audited(reg):
    reg.register("m", _small(), torch.randn(1, 4))
    with pytest.raises(PromotionRefusedError, match="needs a reason"):
        reg.promote("m", 1, force=True)
    reg.promote("m", 1, force=True, why="hotfix", user="bob")
    ev = reg.history("m")[-1]
    assert ev["event"] == "promote" and ev["forced"] is True and ev["why"] == "hotfix" and ev["user"] == "bob"


def test_canary_and_rollback_cycle(reg):
    vs = [reg.register("m", _small(s), torch.randn(1, 4)) for s in range(3)]
    for mv in vs:
        _pass_gate(reg, mv)
    with pytest.raises(PromotionRefusedError, match="no production"):
        reg.set_canary("m", 2, 0.1)
    reg.promote("m", 1)
    reg.promote("m", 2)
    a = reg.set_canary("m", 3, 0.25)
    assert (a.production, a.canary, a.canary_weight) == (2, 3, 0.25)
    assert reg.set_canary_weight("m", 0.5).canary_weight == 0.5
    with pytest.raises(InvalidNameError, match=r"in \(0%, 100%\]"):
        reg.set_canary("m", 3, 1.5)
    with pytest.raises(PromotionRefusedError, match="already production"):
        reg.set_canary("m", 2, 0.1)
    serial = a.serial
    a = reg.rollback("m", why="bad latency")
    assert (a.production, a.canary, a.previous) == (1, None, ())
    assert a.serial > serial
    with pytest.raises(PromotionRefusedError, match="no previous production"):
        reg.rollback("m")
    assert [e["event"] for e in reg.history("m")][-5:] == ["promote", "promote", "canary", "canary", "rollback"]
    # promoting the canary ends it
    reg.set_canary("m", 3, 0.1)
    a = reg.promote("m", 3)
    assert (a.production, a.canary, a.previous) == (3, None, (1,))
    assert reg.end_canary("m").canary is None


@pytest.mark.parametrize("content", ['{"production": {"vers', "", "not json at all", "[1, 2]",
                                     '{"production": {"version": "../../x"}}',
                                     '{"canary": {"version": 2, "weight": 7}}'])
def test_broken_aliases_file_gives_a_clear_error_and_can_be_repaired(reg, content):
    mv = reg.register("m", _small(), torch.randn(1, 4))
    _pass_gate(reg, mv)
    reg.promote("m", 1)
    reg.aliases_path("m").write_text(content)
    with pytest.raises(RegistryCorruptError, match="kit aliases repair m"):
        reg.aliases("m")
    with pytest.raises(RegistryCorruptError):
        reg.get("m")  # resolving the default ref reads the aliases
    a = reg.repair_aliases("m")
    assert a.production == 1 and reg.aliases("m").production == 1


def test_tampered_file_is_reported_by_verify_and_refused_by_load(reg):
    mv = reg.register("m", _small(), torch.randn(1, 4))
    assert all(r.ok for r in reg.verify())
    data = bytearray((mv.path / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mv.path / "model.pt2").write_bytes(bytes(data))
    (r,) = reg.verify("m")
    assert not r.ok and "model.pt2: sha256" in r.problems[0]
    with pytest.raises(IntegrityError, match="Refusing to load m@1"):
        reg.load("m", 1)
    (mv.path / "example.npz").unlink()
    assert any("example.npz: missing" in p for p in reg.verify("m")[0].problems)


def test_load_checks_reference_and_env(reg):
    model = _small()
    reg.register("m", model, torch.randn(3, 4))
    lm = reg.load("m", 1)
    assert lm.check_reference() <= 1e-6
    assert lm.drift is not None and lm.drift.ok
    x = torch.randn(5, 4)
    torch.testing.assert_close(lm(x), model(x).detach())


def test_load_refuses_an_incompatible_environment(reg):
    mv = reg.register("m", _small(), torch.randn(1, 4))
    meta = json.loads((mv.path / "meta.json").read_text())
    meta["env"]["torch"] = "1.13.1"
    (mv.path / "meta.json").write_text(json.dumps(meta))  # meta.json is not itself hashed
    with pytest.raises(Exception, match="torch changed 1.13.1"):
        reg.load("m", 1)
    assert reg.load("m", 1, check_env=False).version.version == 1


def test_stale_temporary_folders_are_cleaned(reg):
    reg.register("m", _small(), torch.randn(1, 4))
    stale = reg.model_dir("m") / ".tmp-999999999-dead"
    stale.mkdir()
    reg.register("m", _small(), torch.randn(1, 4))
    assert not stale.exists()


def test_a_version_whose_register_event_was_lost_is_in_the_history_from_its_meta(reg):
    """A writer SIGKILLed between the rename that made its version visible and the append of its event:
    the history still lists the register, rebuilt from the version's meta.json and marked so."""
    reg.register("m", _small(1), torch.randn(2, 4))
    mv2 = reg.register("m", _small(2), torch.randn(2, 4))
    events = reg.events_path("m")
    events.write_text("".join(ln for ln in events.read_text().splitlines(keepends=True) if '"version": 2' not in ln))
    registers = [e for e in reg.history("m") if e["event"] == "register"]
    assert [e["version"] for e in registers] == [1, 2]
    assert "recovered" not in registers[0] and registers[1]["recovered"].startswith("from meta.json")
    assert (registers[1]["ts"], registers[1]["artifact_sha256"]) == (mv2.created, mv2.artifact_sha256)
