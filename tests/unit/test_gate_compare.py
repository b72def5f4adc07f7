"""kit.gate.compare (the candidate against production), kit.gate.production, the per-check time budget and the
progress follower, without a kernel.

The pure functions get deterministic inputs; the recorded checks run on real registered versions
(tests/gate_models.py: v2 a slightly moved v1, v3 the v2 net doing its work three times).
"""

from __future__ import annotations

import json
import time

import gate_models as gm
import numpy as np
import pytest
import torch

from kit.errors import GateError
from kit.gate import compare, production, record, suite
from kit.gate.progress import Follower, describe

pytestmark = pytest.mark.usefixtures("fresh_gate_recorder")  # tests/unit/conftest.py


@pytest.fixture(autouse=True)
def _default_budget():
    yield
    record.set_budget(record.DEFAULT_CHECK_BUDGET_S)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A registry with wide@1, @2 (slightly moved) and @3 (3x the work), loaded."""
    from kit.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("cmp") / "registry", require_gate=False)
    for m in gm.versions():
        reg.register("wide", m, gm.example(), onnx=False)
    return reg, [reg.load("wide", v) for v in (1, 2, 3)]


def _checks() -> dict[str, record.Check]:
    return {c.name: c for c in record.checks()}


# ---------------------------------------------------------------- pure functions, deterministic inputs


def test_interleave_alternates_the_order_each_round():
    calls: list[str] = []
    a_ms, b_ms = compare.interleave(lambda: calls.append("a"), lambda: calls.append("b"), 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(a_ms) == len(b_ms) == 4 and all(t >= 0 for t in a_ms + b_ms)


def test_interleave_stops_at_the_deadline_after_one_round():
    d = record.Deadline("latency", 0.0)
    a_ms, b_ms = compare.interleave(lambda: None, lambda: None, 1000, d)
    assert len(a_ms) == len(b_ms) == 1 and d.stopped


def test_latency_ratio_judges_the_fastest_calls_with_a_slack():
    prod = [10.0, 10.5, 9.5, 10.0, 30.0]  # load only adds time: 9.5 is production's own cost
    same = compare.compare_latency([10.2, 9.9, 10.1, 10.0, 11.0], prod, batch=1)
    assert same.passed and same.ratio == pytest.approx(9.9 / 9.5)
    # a preempted thread slows single calls of either side (here the candidate's more often than production's):
    # the median per-round ratio moves (1.6x), the fastest calls do not
    loaded = compare.compare_latency([10.0, 40.0, 16.0, 80.0, 11.0], [10.0, 12.0, 10.0, 40.0, 10.5])
    assert loaded.round_ratio == pytest.approx(1.6) and loaded.ratio == pytest.approx(1.0) and loaded.passed
    # the candidate's fastest - 1.25 x production's fastest: 9.9 - 11.875
    assert same.excess_ms == pytest.approx(9.9 - 1.25 * 9.5)
    slow = compare.compare_latency([30.0, 31.0, 28.5, 30.0, 30.5], prod, batch=8)
    assert not slow.passed and slow.ratio == pytest.approx(3.0) and slow.round_ratio > 1.25
    assert "fastest call 28.500 ms vs production 9.500 ms" in slow.detail() and "5 interleaved rounds" in slow.detail()
    assert "median 30.000 vs 10.000" in slow.detail() and "(16.625 ms fastest" in slow.detail()
    # a crowded runner where production's calls caught the rare quiet moments and the candidate's did not: the
    # fastest calls say 1.6x, the rounds (each pair back to back) say 1.0x; a breach counts only when both see it
    lucky = compare.compare_latency([8.0, 16.0, 15.0, 17.0, 16.5], [5.0, 16.5, 14.5, 17.5, 16.0])
    assert not lucky.fastest_passed and lucky.rounds_passed and lucky.passed
    # a sub-millisecond model: 0.05 ms vs 0.02 ms is 2.5x but inside the slack, so noise cannot fail it
    tiny = compare.compare_latency([0.05] * 5, [0.02] * 5)
    assert tiny.ratio == pytest.approx(2.5) and tiny.passed
    assert not compare.compare_latency([0.05] * 5, [0.02] * 5, slack_ms=0.0).passed
    with pytest.raises(ValueError):
        compare.compare_latency([], [1.0])


def test_agreement_by_argmax_for_classifier_outputs():
    prod = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    cand = prod.copy()
    cand[0] = [0, 0, 0, 1]  # one row of ten changes class
    a = compare.agreement([cand], [prod])
    assert (a.kind, a.value, a.passed) == ("argmax", 0.9, False)
    assert compare.agreement([cand], [prod], min_agreement=0.9).passed
    assert compare.agreement([prod + 0.1], [prod]).value == 1.0


def test_agreement_by_relative_deviation_and_equality():
    prod = np.array([[100.0], [-50.0], [20.0]])
    dev = compare.agreement([prod + [[1.0], [0.0], [0.0]]], [prod])
    assert dev.kind == "deviation" and dev.value == pytest.approx(0.01) and dev.passed
    assert not compare.agreement([prod * 1.2], [prod]).passed  # 20 / 100 > 0.05
    ints = compare.agreement([np.array([1, 2, 3, 4])], [np.array([1, 2, 3, 5])])
    assert (ints.kind, ints.value, ints.passed) == ("equal", 0.75, False)
    zeros = compare.agreement([np.full((2, 1), 0.01)], [np.zeros((2, 1))])
    assert zeros.value == pytest.approx(0.01)  # production all zeros: absolute deviation


def test_agreement_fails_on_shapes_and_counts():
    one = np.zeros((2, 3), dtype=np.float32)
    assert compare.agreement([one], [one, one]).kind == "shape"
    bad = compare.agreement([np.zeros((2, 4), dtype=np.float32)], [one])
    assert not bad.passed and "shape (2, 4), production's (2, 3)" in bad.detail
    nan = compare.agreement([np.array([[np.nan]])], [np.array([[1.0]])])
    assert not nan.passed


def test_memory_and_quality_rules():
    assert compare.memory_ratio(150, 100) == (1.5, True)
    assert compare.memory_ratio(151, 100)[1] is False
    assert compare.no_worse(0.895, 0.90, 0.01) and not compare.no_worse(0.88, 0.90, 0.01)
    assert compare.no_worse(0.21, 0.20, 0.01, higher_is_better=False)
    assert not compare.no_worse(0.25, 0.20, 0.01, higher_is_better=False)
    assert not compare.no_worse(float("nan"), 0.9, 0.01)


# ---------------------------------------------------------------- recorded checks on real versions


def test_a_slightly_moved_version_passes_against_production(wide, capsys):
    _, (v1, v2, _) = wide
    assert compare.against(v2, v1, batch_n=8, rounds=10) is True
    got = _checks()
    assert list(got) == ["same signature as production", "output agreement vs production (argmax)",
                         "latency vs production, batch 1", "latency vs production, batch 8",
                         "artifact size vs production"]
    assert all(c.passed for c in got.values()), capsys.readouterr().out
    assert "model.pt2" in got["artifact size vs production"].detail
    assert "interleaved rounds" in got["latency vs production, batch 1"].detail


def test_three_times_the_work_fails_on_the_ratio(wide):
    _, (v1, _, v3) = wide
    out = compare.latency(v3, v1, batch_n=4, rounds=30)
    assert [c.batch for c in out] == [1, 4] and all(c.ratio > 1.25 and not c.passed for c in out)
    got = _checks()
    assert not got["latency vs production, batch 1"].passed and not got["latency vs production, batch 4"].passed
    assert got["latency vs production, batch 4"].threshold == 1.25


def test_no_production_records_nothing(wide, capsys):
    _, (v1, _, _) = wide
    assert compare.against(v1, None) is False
    assert record.checks() == () and "No production version to compare" in capsys.readouterr().out


def test_a_changed_signature_fails_and_skips_the_rest(tmp_path, wide):
    from kit.registry import Registry

    _, (v1, _, _) = wide
    reg = Registry(tmp_path / "r", require_gate=False)
    reg.register("other", torch.nn.Linear(gm.FEATURES + 1, gm.CLASSES).eval(),
                 torch.randn(2, gm.FEATURES + 1), onnx=False)
    assert compare.against(reg.load("other", 1), v1) is True
    got = _checks()
    assert not got["same signature as production"].passed
    assert "float32[batch, 257] (production x: float32[batch, 256])" in got["same signature as production"].detail
    assert "latency vs production, batch 1" not in got and "artifact size vs production" in got


def test_quality_against_production_on_data(tmp_path, wide):
    _, (v1, v2, _) = wide
    x = gm.example(32).numpy()
    labels = suite.predict(v1, suite.native(v1, [x]), None).argmax(-1)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    mine, theirs = compare.quality(v2, v1, tmp_path / "d.npz")
    assert theirs == 1.0 and mine >= 0.99
    c = _checks()["accuracy vs production"]
    assert c.passed and c.threshold == 0.99 and "32 rows of d.npz" in c.detail


# ---------------------------------------------------------------- time budgets, progress


def test_a_step_over_its_budget_fails_naming_the_setting(wide, capsys):
    _, (v1, _, _) = wide
    record.set_budget(1e-6)
    suite.batch_consistency(v1, rows=8)
    budget = _checks()["time budget: batch consistency"]
    assert not budget.passed and budget.threshold == 1e-6
    assert "check_budget_s" in budget.detail and "stopped after" in budget.detail
    assert "… batch consistency (time budget 1e-06s)" in capsys.readouterr().out
    with pytest.raises(GateError, match="check_budget_s must be a positive number"):
        record.set_budget(0)


def test_steps_write_begin_and_end_records_that_the_follower_shows(tmp_path):
    records = tmp_path / "nb.checks.jsonl"
    lines: list[str] = []
    with Follower(records, lines.append, "[1/1] "):
        record._begin_run(str(records), "nb.ipynb", "run-1")
        with record.step("parity", budget_s=5):
            record.check("parity", passed=True, value=0.0, threshold=1e-5)
        deadline = time.monotonic() + 10
        while len(lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the follower's thread shows them while the notebook runs
    assert lines[:3] == ["[1/1]   … parity (budget 5s)", "[1/1]   ✓ PASS  parity = 0 (threshold 1e-05)",
                         lines[2]] and lines[2].startswith("[1/1]     parity: ")
    kinds = [json.loads(x)["kind"] for x in records.read_text().splitlines()]
    assert kinds == ["kernel", "begin", "check", "end"]
    assert describe({"kind": "kernel"}) is None and describe({"kind": "check"}) is None


# ---------------------------------------------------------------- what the gate compares with


def test_production_is_resolved_only_when_another_loadable_version(tmp_path, keyring):
    from kit.registry import Registry

    reg = Registry(tmp_path / "r", require_gate=False, keyring=keyring)
    v1, v2, _ = gm.versions()
    a = reg.register("m", v1, gm.example(), onnx=False)
    b = reg.register("m", v2, gm.example())
    assert production.resolve(reg, a, "torch").note.startswith("no production version")
    reg.promote("m", 1)
    assert production.resolve(reg, a, "torch").version is None  # the candidate is production itself
    base = production.resolve(reg, b, "torch")
    assert (base.version, base.artifact_sha256) == (1, a.artifact_sha256)
    assert production.resolve(reg, b, "onnxruntime").note == "production m@1 has no model.onnx; judged on its own checks"
    with pytest.raises(GateError, match=r"m@1 has no model.onnx, so it cannot be gated on onnxruntime"):
        production.require_artifact(a, "onnxruntime")
    (a.path / "model.pt2").write_bytes(b"changed")
    assert "fails verification" in production.resolve(reg, b, "torch").note


def test_a_notebook_may_compare_only_with_the_resolved_production():
    base = production.Baseline(1, "a" * 64, "production m@1")
    ok = {"kind": "baseline", "sha256": "a" * 64, "ref": "m@1", "signed_by": "k1"}
    assert production.problems([ok], base, signed=True) == []
    other = {**ok, "sha256": "b" * 64, "ref": "m@3"}
    assert "it compared with m@3 sha256 bbbbbbbbbbbb, but the gate resolved production 1" in \
        production.problems([other], base, signed=True)[0]
    assert "without checking its signature" in production.problems([{**ok, "signed_by": None}], base, signed=True)[0]
    none = production.Baseline(None, None, "no production version to compare")
    assert production.problems([ok], none, signed=False)


def _sleeper(ms: list[float]):
    """A call that sleeps the next of ``ms`` milliseconds (its last one from then on)."""
    it = iter(ms)
    last = [ms[-1]]

    def call() -> None:
        last[0] = next(it, last[0])
        time.sleep(last[0] / 1000)
    return call


def test_a_latency_breach_gets_more_rounds_in_the_same_sample():
    d = record.Deadline("latency", 60.0)
    # a busy spell through the first 5 rounds hid the candidate's floor (3 ms): the rounds added find it (1 ms)
    spell = compare._measure(_sleeper([3.0] * 5 + [1.0]), _sleeper([1.0]), 5, d, 1, 1.25, 0.25)
    assert spell.passed and spell.rounds == 10 and spell.ratio < 1.25
    # a real slowdown stays one: 3 more sets of 5 rounds, the fastest calls still 3x apart
    slow = compare._measure(_sleeper([3.0]), _sleeper([1.0]), 5, d, 1, 1.25, 0.25)
    assert not slow.passed and slow.rounds == 20 and slow.ratio > 2.5
    # no time left in the check's budget: no rounds are added
    spent = compare._measure(_sleeper([3.0]), _sleeper([1.0]), 5, record.Deadline("latency", 0.02), 1, 1.25, 0.25)
    assert not spent.passed and spent.rounds <= 5  # (the deadline may stop the first set early too)
