"""Signed move records (kit.registry.moves): a registry writer without a key cannot move traffic, replay an
older move, or act beyond a guard key's delegation; old registries migrate with one command.

Attacks are made the way a registry writer would make them: by writing files in the registry folder.
The service-side refusals against real gunicorn workers are in tests/e2e/test_signed_moves_service.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from kit_testing import three_versions

from kit.errors import PromotionRefusedError, RegistryCorruptError, SignatureError
from kit.registry import Registry
from kit.registry.moves import MoveStorage, canonical, envelope, new_record
from kit.signing import Keyring, KeyStore
from kit.traffic import guard_step, guard_stop


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path / "keys")


@pytest.fixture
def reg(tmp_path, keys) -> Registry:
    return three_versions(Registry(tmp_path / "reg", user="alice", keyring=keys), gated=(1, 2))


def reader(reg: Registry) -> Registry:
    """A service's view of the registry: only public keys (what [trust] public_keys gives it)."""
    return Registry(reg.root, require_gate=False, keyring=Keyring.verify_only(reg.keyring.trust()))


def attacker_key(tmp_path):
    return KeyStore(tmp_path / "attacker").new()


def pointer(reg: Registry) -> dict:
    return json.loads(reg.aliases_path("m").read_bytes())


def test_every_move_is_a_signed_chained_record_and_aliases_json_is_a_copy(reg):
    reg.set_canary("m", 2, 0.1, why="try v2")
    reg.set_canary("m", 2, 0.3)
    st = MoveStorage(reg.model_dir("m"))
    assert st.serials() == [1, 2, 3]
    assert reg.aliases_path("m").read_bytes() == st.read(3)  # aliases.json is the newest record, byte for byte
    recs = [json.loads(json.loads(st.read(s))["record"]) for s in st.serials()]
    assert [r["action"] for r in recs] == ["promote", "canary", "canary"]
    assert recs[0]["prev_sha256"] is None and recs[0]["relies_on"]["gate"]["run_id"] == "r1"
    assert recs[1]["state"]["canary"]["version"] == 2 and recs[1]["artifacts"]["2"] == reg.get("m", 2).artifact_sha256
    import hashlib
    assert recs[2]["prev_sha256"] == hashlib.sha256(canonical(recs[1])).hexdigest()
    a = reader(reg).aliases("m")
    assert (a.production, a.canary, a.canary_weight, a.serial, a.signed_by) == (1, 2, 0.3, 3, reg.keyring.signer().key_id)
    hist = [e for e in reg.history("m") if "serial" in e and e.get("verified") is not None]
    assert [e["event"] for e in hist] == ["promote", "canary", "canary"] and all(e["verified"] for e in hist)


def test_forged_aliases_json_is_refused_and_the_writer_can_repair(reg, tmp_path):
    good = reg.aliases_path("m").read_bytes()
    svc = reader(reg)
    assert svc.aliases("m").production == 1
    # 1. the old unsigned format pointing at v3 (whose gate never passed)
    reg.aliases_path("m").write_text(json.dumps({"production": {"version": 3, "previous": [1]}, "serial": 99}))
    with pytest.raises(RegistryCorruptError, match="not a signed move record.*kit aliases repair m"):
        svc.aliases("m")
    # 2. the signed record with its state edited (the signature no longer matches)
    env = json.loads(good)
    env["record"] = env["record"].replace('"production":1', '"production":3')
    reg.aliases_path("m").write_text(json.dumps(env))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        svc.aliases("m")
    # 3. a record signed by the attacker's own key, and one with no signature at all
    rec = json.loads(json.loads(good)["record"])
    rec["state"]["production"] = 3
    reg.aliases_path("m").write_bytes(envelope(rec, attacker_key(tmp_path)))
    with pytest.raises(SignatureError, match="not trusted here"):
        svc.aliases("m")
    reg.aliases_path("m").write_bytes(envelope(rec, None))
    with pytest.raises(SignatureError, match="not signed"):
        svc.aliases("m")
    # the writer never reads aliases.json: it moves on from the newest valid record, and repair restores
    assert reg.repair_aliases("m").production == 1 and svc.aliases("m").production == 1
    reg.aliases_path("m").write_text("{}")
    assert reg.set_canary("m", 2, 0.2).serial == 2 and svc.aliases("m").canary == 2


def test_a_forged_newer_record_in_moves_is_not_followed(reg, tmp_path):
    rec = json.loads(json.loads(reg.aliases_path("m").read_bytes())["record"])
    forged = new_record("m", 2, None, "promote", {**rec["state"], "production": 3}, user="mallory", ts="x",
                        why=None, artifacts={}, relies_on={})
    st = MoveStorage(reg.model_dir("m"))
    assert st.create(2, envelope(forged, attacker_key(tmp_path)))
    svc = reader(reg)
    assert svc.aliases("m").production == 1  # not followed
    (ev,) = [e for e in reg.history("m") if e.get("serial") == 2]
    assert ev["verified"] is False and "not trusted" in ev["problem"]
    with pytest.raises(PromotionRefusedError, match="taken by another writer"):  # deny, nothing more
        reg.promote("m", 2)
    assert svc.aliases("m").production == 1


def test_replaying_an_older_record_is_refused_by_a_reader_that_saw_a_newer_one(reg):
    old = reg.aliases_path("m").read_bytes()  # serial 1: production v1
    reg.promote("m", 2)
    svc = reader(reg)
    assert svc.aliases("m").production == 2
    reg.aliases_path("m").write_bytes(old)  # put the older, validly signed record back
    assert reader(reg).aliases("m").production == 2  # a fresh reader follows the newer records forward
    shutil.move(str(MoveStorage(reg.model_dir("m")).path(2)), str(reg.root / "hidden"))  # hide the newer one too
    with pytest.raises(SignatureError, match="serial 1 refused.*already followed serial 2"):
        svc.aliases("m")  # a service that followed serial 2 never goes back


def test_a_record_copied_from_another_model_is_refused(reg):
    three_versions(reg, name="other", gated=(1, 2))
    reg.promote("other", 2)
    reg.aliases_path("m").write_bytes(reg.aliases_path("other").read_bytes())
    with pytest.raises(SignatureError, match="model 'other', not 'm'"):
        reader(reg).aliases("m")


def test_two_writers_racing_for_one_serial_one_wins(reg):
    st = MoveStorage(reg.model_dir("m"))
    assert st.create(7, b"a") is True and st.create(7, b"b") is False
    assert st.read(7) == b"a"


def _guarded(reg: Registry, tmp_path, steps=(0.25, 0.5, 1.0)):
    guard = KeyStore(tmp_path / "svc").new()
    reg.register_guard_key("m", guard.public.text(), service="svc", steps=list(steps))
    reg.set_canary("m", 2, 0.1, why="canary with a guard")
    return guard, reader(reg)


def test_guard_key_steps_along_the_plan_and_ends_the_canary(reg, tmp_path):
    guard, svc = _guarded(reg, tmp_path)
    assert svc.aliases("m").guards.keys() == {guard.key_id}
    s = svc.aliases("m").serial
    change = guard_step(svc, "m", 2, s, 0.25, {"ok": True}, signer=guard)
    assert change is not None and reader(reg).aliases("m").canary_weight == 0.25
    a = reader(reg).aliases("m")
    assert a.signed_by == guard.key_id and a.guards.keys() == {guard.key_id}
    assert guard_stop(svc, "m", 2, a.serial, {"detail": "5xx"}, signer=guard) is not None
    a = reader(reg).aliases("m")
    assert (a.production, a.canary) == (1, None)
    assert [e["by_guard"] for e in reg.history("m") if e.get("event") in ("canary_step", "canary_guard")] == [True, True]


def test_guard_key_cannot_jump_the_plan_promote_without_gate_or_act_undelegated(reg, tmp_path):
    guard, svc = _guarded(reg, tmp_path)
    s = svc.aliases("m").serial
    with pytest.raises(SignatureError, match="next value of its plan"):
        guard_step(svc, "m", 2, s, 0.5, {}, signer=guard)  # 0.1 -> 0.5 skips 0.25
    with pytest.raises(SignatureError, match="may not promote before the plan reaches 100%"):
        svc.promote("m", 2, expect_serial=s, signer=guard)
    assert MoveStorage(reg.model_dir("m")).serials() == [1, 2]  # nothing was written
    # a record the guard key signs by hand, put straight into the registry, is not followed either
    rec = json.loads(json.loads(reg.aliases_path("m").read_bytes())["record"])
    import hashlib
    prev = hashlib.sha256(canonical(rec)).hexdigest()
    bad = {**rec, "serial": s + 1, "prev_sha256": prev, "action": "canary_step",
           "state": {**rec["state"], "canary": {**rec["state"]["canary"], "weight": 1.0}}}
    reg.aliases_path("m").write_bytes(envelope(bad, guard))
    with pytest.raises(SignatureError, match="guard key .* may not step"):
        reader(reg).aliases("m")
    reg.repair_aliases("m")
    # a guard key registered after the canary started was not delegated by it
    late = KeyStore(tmp_path / "late").new()
    reg.register_guard_key("m", late.public.text(), service="late", steps=[0.25])
    with pytest.raises(SignatureError, match="not trusted here"):
        guard_stop(svc, "m", 2, s, {}, signer=late)


def test_guard_key_promotes_at_100_only_with_a_signed_passing_gate(reg, tmp_path):
    guard, svc = _guarded(reg, tmp_path, steps=(0.5, 1.0))
    guard_step(svc, "m", 2, svc.aliases("m").serial, 0.5, {}, signer=guard)
    change = guard_step(svc, "m", 2, svc.aliases("m").serial, 1.0, {"hold_s": 1}, signer=guard)
    assert change is not None and reader(reg).aliases("m").production == 2
    ev = reg.history("m")[-1]
    assert ev["event"] == "promote" and ev["by_guard"] and ev["relies_on"]["gate"]["run_id"] == "r1"
    # v3 has no passing gate: a human canary of it (forced) can never be promoted by the guard
    reg.set_canary("m", 3, 0.5, force=True, why="try v3 ungated")
    with pytest.raises(PromotionRefusedError, match="no passing gate"):
        guard_step(svc, "m", 3, svc.aliases("m").serial, 1.0, {}, signer=guard)
    assert reader(reg).aliases("m").production == 2


def test_migrating_an_old_unsigned_registry(tmp_path, keys):
    old = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None), gated=(1, 2))  # unsigned records
    shutil.rmtree(old.model_dir("m") / "moves")  # what a registry written before signed moves looks like
    old.aliases_path("m").write_text(json.dumps({"schema": 1, "serial": 6, "updated": "2026-01-01T00:00:00Z",
                                                 "production": {"version": 2, "previous": [1]}}))
    reg = Registry(tmp_path / "reg", user="alice", keyring=keys)
    for mv in reg.versions("m"):
        reg.sign_version("m", mv.version)
    with pytest.raises(SignatureError, match="kit aliases migrate m"):
        reader(reg).aliases("m")
    with pytest.raises(PromotionRefusedError, match="kit aliases migrate m"):
        reg.rollback("m")
    plan = reg.plan_migration("m")
    assert (plan.production, plan.previous, plan.serial) == (2, (1,), 6)
    a = reg.migrate_aliases("m", expect=plan)
    assert (a.production, a.serial, a.action) == (2, 7, "migrate")
    assert reader(reg).aliases("m").production == 2
    assert reg.rollback("m").production == 1 and reader(reg).aliases("m").serial == 8
    with pytest.raises(PromotionRefusedError, match="already has signed move records"):
        reg.migrate_aliases("m")


def test_unsigned_registry_reads_and_moves_without_keys(tmp_path):
    reg = three_versions(Registry(tmp_path / "reg", keyring=None), gated=(1, 2))
    assert reg.promote("m", 2).production == 2 and reg.aliases("m").signed_by is None
    reg.aliases_path("m").write_text("[1]")
    with pytest.raises(RegistryCorruptError):
        reg.aliases("m")


def test_a_generated_service_registers_its_guard_key_with_its_plan(reg, tmp_path):
    from kit.guard_key import load_or_create_guard_key
    from kit.servicegen import generate
    from kit.traffic import register_service_guard

    d = generate("web", "m", registry=reg.root, out_dir=tmp_path / "services", guard_steps=[25, 100],
                 check_model=False)
    kid = register_service_guard(reg, d, user="alice")
    assert kid == load_or_create_guard_key(d).key_id
    assert reg.guard_keys("m")[kid]["steps"] == [0.25, 1.0]
    reg.set_canary("m", 2, 0.1)
    assert reader(reg).aliases("m").guards[kid]["service"] == "web"


def test_a_record_created_but_not_copied_to_aliases_json_is_followed(reg):
    """What a kill between creating the record and rewriting aliases.json leaves: the record is the move."""
    ml = reg.movelog("m")
    head, cur = ml.base()
    ml.storage.write_pointer = lambda data: None  # the kill: aliases.json is never rewritten
    ml.commit(head, "canary", cur, reg.keyring.signer(), user="x", why=None, artifacts={}, relies_on={}, details={})
    assert reg.aliases_path("m").read_bytes() == ml.storage.read(1)
    assert reader(reg).aliases("m").serial == 2


def test_a_guard_promotion_record_without_a_signed_passing_gate_is_not_followed(reg, tmp_path):
    """Past the writer's own checks: a promote record the guard key signs by hand, at the end of its plan,
    naming no gate, or a gate whose result.json is not the one it names, is refused by readers."""
    import hashlib

    guard, svc = _guarded(reg, tmp_path, steps=(1.0,))
    rec = json.loads(json.loads(reg.aliases_path("m").read_bytes())["record"])
    base = {**rec, "serial": rec["serial"] + 1, "prev_sha256": hashlib.sha256(canonical(rec)).hexdigest(),
            "action": "promote", "state": {"production": 2, "previous": [1], "canary": None}}
    for relies_on, why in [({}, "no gate named"),
                           ({"gate": {"version": 2, "run_id": "r1", "result_sha256": "0" * 64}}, "not the one")]:
        reg.aliases_path("m").write_bytes(envelope({**base, "relies_on": relies_on}, guard))
        with pytest.raises(SignatureError, match=f"promote without a signed passing gate.*{why}"):
            reader(reg).aliases("m")


def test_a_first_move_made_by_another_writer_meanwhile_asks_for_a_refresh_not_a_signature_error(reg):
    """Two writers' first moves at once: the loser listed no records, then the winner's record 1 appeared.
    (Before one listing decided, the loser's second listing saw it and said "no move record verifies".)"""
    ml = reg.movelog("never-moved")
    listings = iter([[], [1]])  # the second listing would see the other writer's record
    ml.storage.serials = lambda: next(listings)
    head, cur = ml.base()
    assert head is None and cur.production is None  # its create of serial 1 then fails: remedy "refresh"
