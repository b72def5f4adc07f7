"""The replay gate notebook (kit/notebooks/validation/replay.ipynb) run by the real gate (papermill, a real
kernel) over traffic captured by the real recorder: a twin of production passes, another model fails on
agreement, and too little traffic fails on evidence. The report opens with the model card (kit.gate.card)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kit_testing import project_keyring
from torch import nn

import kit
from kit import gate
from kit.registry import Registry
from kit.serving.recorder import CaptureSettings, Recorder

pytestmark = [pytest.mark.timeout(300)]
NOTEBOOK = Path(kit.__file__).parent / "notebooks" / "validation" / "replay.ipynb"


def test_the_notebook_is_package_data_where_kit_replay_says():
    from kit.replay import REPLAY_NOTEBOOK

    assert REPLAY_NOTEBOOK == NOTEBOOK.resolve() and REPLAY_NOTEBOOK.is_file()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay-gate")
    reg = Registry(root / "registry", require_gate=False, user="t", keyring=project_keyring())
    for seed in (3, 3, 4):  # v2 is v1's twin
        torch.manual_seed(seed)
        reg.register("clf", nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).eval(), torch.randn(2, 5),
                     metrics={"accuracy": 0.93})
    prod = reg.load("clf", 1)
    cap = root / "capture"
    rec = Recorder(CaptureSettings(enabled=True, sample_rate=1.0), "clf", cap)
    gen = torch.Generator().manual_seed(1)
    for i in range(50):
        x = torch.randn(2, 5, generator=gen)
        rec.record(f"r{i}", 1, 200, 0.001, prod.signature, (x,), (prod(x),))
    rec.close()
    return reg, cap


def test_the_twin_passes_and_another_model_fails(setup):
    reg, cap = setup
    ok = gate.run_gate(reg, "clf", 2, notebooks=[NOTEBOOK], params={"capture": str(cap)}, timeout=120)
    assert ok.passed, gate.render_text(ok)
    assert [c.name for c in ok.checks] == ["replay_records", "replay_agreement", "replay_errors"]
    assert ok.checks[1].value == 1.0
    # the report opens with the model card: signature, lineage, environment, metrics, the gate's data, verdicts
    report = ok.report.read_text()
    card = report[report.index("Model card: clf@2"):report.index("Checks and verdicts")]
    assert report.index("Model card: clf@2") < report.index("Notebook replay.ipynb")
    for needed in ("<code>input</code> float32 [batch, 5]", "Lineage", "git commit", "torch", "2.13.0",
                   "Metrics", "accuracy", str(cap), "replay.ipynb"):
        assert needed in card, needed
    assert "replay_agreement" in report[report.index("Checks and verdicts"):]
    bad = gate.run_gate(reg, "clf", 3, notebooks=[NOTEBOOK], params={"capture": str(cap)}, timeout=120)
    assert not bad.passed and not bad.checks[1].passed and bad.checks[1].value < 0.99
    thin = gate.run_gate(reg, "clf", 2, notebooks=[NOTEBOOK], params={"capture": str(cap), "limit": 5},
                         timeout=120)
    assert not thin.passed and not thin.checks[0].passed and thin.checks[0].value == 5
