"""The default gate judges a candidate against production, with real papermill kernels, no --force.

wide@1 (no production yet) passes on its own checks and is promoted; wide@2, slightly moved weights, passes
against it (the report shows the comparison); wide@3, the v2 net doing its work three times, fails on the
latency ratio, and `kit promote` refuses it naming that check, its figure and the report. With busy loops
on every core beside the gate's checks, the verdicts on the same candidates are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gate_models as gm
import pytest
from click.testing import CliRunner

from kit import gate
from kit.cli import cli
from kit.errors import GateError, PromotionRefusedError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Jupyter is migrating its paths:DeprecationWarning"),
]

# Small figures: the point is the verdict, not precision. A breach is measured again with up to 3 more sets of
# rounds (kit.gate.compare), so wide@3 always runs 40 rounds a batch size, and wide@2 under load as many if it needs.
PARAMS = {"batch_n": 16, "latency_repeats": 10}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """wide@1 gated alone and promoted, @2 and @3 registered and gated against it (progress kept)."""
    from kit_testing import project_keyring

    from kit.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("gate-prod") / "registry", require_gate=True, user="tester",
                   keyring=project_keyring())
    v1, v2, v3 = gm.versions()
    reg.register("wide", v1, gm.example(), onnx=False)
    lines: dict[int, list[str]] = {1: [], 2: [], 3: []}
    first = gate.run_gate(reg, "wide", 1, params=PARAMS, progress=lines[1].append, timeout=300)
    if first.passed:
        reg.promote("wide", 1)
    reg.register("wide", v2, gm.example(), onnx=False)
    reg.register("wide", v3, gm.example(), onnx=False)
    results = {1: first, **{v: gate.run_gate(reg, "wide", v, params=PARAMS, progress=lines[v].append, timeout=300)
                            for v in (2, 3)}}
    return reg, results, lines


def _names(result) -> list[str]:
    return [c.name for c in result.checks]


def test_the_first_version_is_judged_on_its_own_checks(flow):
    reg, results, lines = flow
    r = results[1]
    assert r.passed, gate.render_text(r)
    assert r.baseline == {"version": None, "artifact_sha256": None,
                          "note": "no production version to compare; judged on its own checks"}
    assert not any("production" in n or n.startswith("latency") for n in _names(r))
    assert lines[1][0] == "compared with: nothing (no production version to compare; judged on its own checks)"
    assert reg.aliases("wide").production == 1  # promoted without force


def test_a_second_version_passes_against_production_and_the_report_shows_it(flow):
    reg, results, lines = flow
    r = results[2]
    assert r.passed, gate.render_text(r)
    v1 = reg.get("wide", 1)
    assert r.baseline == {"version": 1, "artifact_sha256": v1.artifact_sha256, "note": "production wide@1"}
    compared = [n for n in _names(r) if "production" in n]
    assert compared == ["same signature as production", "output agreement vs production (argmax)",
                        "latency vs production, batch 1", "latency vs production, batch 16",
                        "artifact size vs production"]
    stored = json.loads((r.run_dir / "result.json").read_text())
    assert stored["baseline"]["version"] == 1 and stored["passed"] is True
    page = r.report.read_text()
    assert "Compared with production wide@1" in page and "latency vs production, batch 16" in page
    assert f"Compared with production wide@1 (sha256 {v1.short_sha})" in gate.render_text(r)
    # progress while it ran: each step's start (with its budget) and its figure, as they happened
    text = "\n".join(lines[2])
    assert lines[2][0] == f"compared with: production wide@1 sha256 {v1.short_sha}"
    assert "[1/1]   … latency vs production, batch 1 (budget 120s)" in text
    assert "[1/1]   ✓ PASS  latency vs production, batch 1 = " in text
    assert text.index("… parity on the stored example") < text.index("✓ PASS  parity on the stored example") \
        < text.index("… latency vs production, batch 1") < text.index("default.ipynb: passed")


def test_three_times_the_work_fails_on_the_ratio_and_promote_names_the_check(flow):
    reg, results, _ = flow
    r = results[3]
    assert not r.passed
    failed = {c.name: c for c in r.failed_checks}
    assert "latency vs production, batch 16" in failed, gate.render_text(r)
    assert set(failed) <= {"latency vs production, batch 1", "latency vs production, batch 16"}
    assert failed["latency vs production, batch 16"].value > 1.25
    with pytest.raises(PromotionRefusedError) as e:
        reg.promote("wide", 3)
    msg = str(e.value)
    assert f"Its last gate (run {r.run_id}, backend torch) failed: latency vs production, batch" in msg
    assert "(threshold 1.25)" in msg and f"report: {r.report}" in msg
    out = CliRunner().invoke(cli, ["--registry", str(reg.root), "promote", "wide@3"])
    assert out.exit_code == 2 and "latency vs production, batch 16 = " in out.output and "report: " in out.output


class BusyLoops:
    """A progress sink that runs a busy loop on every core while the kernel checks: from the line saying it
    compares with production (both models loaded, before the first check) to the first step after the
    latency checks. Loops over the kernel's start as well (seconds of both cores a run) proved nothing more."""

    def __init__(self) -> None:
        self.loops: list[subprocess.Popen] = []
        self.ran = False

    def __call__(self, line: str) -> None:
        if "  compared with production " in line and not self.ran:
            self.ran = True
            self.loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                          for _ in range(os.cpu_count() or 2)]
        elif "… memory vs production" in line:
            self.stop()

    def stop(self) -> None:
        for p in self.loops:
            p.kill()
            p.wait()
        self.loops = []


def _gate_under_load(reg, version: int):
    loops = BusyLoops()
    try:
        result = gate.run_gate(reg, "wide", version, params=PARAMS, progress=loops, timeout=300)
    finally:
        loops.stop()
    assert loops.ran, "the loops never started: the gate never said it compared with production"
    return result


def test_the_verdicts_do_not_move_with_the_machines_load(flow):
    """Busy loops on every core beside the gate's checks: both sides of each comparison slow alike."""
    reg, results, _ = flow
    busy = {v: _gate_under_load(reg, v) for v in (2, 3)}
    for v in (2, 3):
        assert busy[v].baseline == results[v].baseline  # the same comparison, against wide@1
        assert busy[v].passed is results[v].passed, gate.render_text(busy[v])
    assert "latency vs production, batch 16" in {c.name for c in busy[3].failed_checks}


def test_onnxruntime_without_model_onnx_is_refused_before_any_kernel(flow):
    reg, _, _ = flow
    before = sorted(p.name for p in reg.gate_root("wide", 2).iterdir())
    with pytest.raises(GateError, match=r"wide@2 has no model.onnx, so it cannot be gated on onnxruntime"):
        gate.run_gate(reg, "wide", 2, backend="onnxruntime")
    assert sorted(p.name for p in reg.gate_root("wide", 2).iterdir()) == before
