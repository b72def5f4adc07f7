"""kit.replay and `kit replay`: captured requests (written by the real recorder) through a candidate version.

Traffic captured by a real service (gunicorn) and replayed with the command: tests/e2e/test_capture_replay.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kit.errors import NotFoundError
from kit.registry import Registry
from kit.replay import replay
from kit.serving.recorder import CaptureSettings, Recorder


def _capture(reg: Registry, folder, version: int, n: int, drop: tuple[str, ...] = ()) -> None:
    """What a service serving ``version`` writes for ``n`` requests (batches of 1-3 rows)."""
    loaded = reg.load("m", version)
    rec = Recorder(CaptureSettings(enabled=True, sample_rate=1.0, drop_inputs=drop), "m", folder)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        x = torch.randn(1 + i % 3, 8, generator=gen)
        rec.record(f"r{i}", version, 200, 0.002, loaded.signature, (x,), (loaded(x),))
    rec.close()


@pytest.fixture
def reg(tmp_path, keyring) -> Registry:
    reg = Registry(tmp_path / "reg", require_gate=False, user="t", keyring=keyring)  # signed, as the CLI expects
    for seed in (0, 0, 1):  # v1 and v2 identical, v3 another model
        torch.manual_seed(seed)
        reg.register("m", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)), torch.randn(2, 8))
    return reg


def test_replay_agrees_with_an_identical_version_and_finds_a_different_one(reg, tmp_path):
    cap = tmp_path / "cap"
    _capture(reg, cap, 1, 40)
    same = replay(reg, "m", 2, cap)
    assert same.mode == "argmax" and same.replayed == 40 and same.rows == 79 and same.agreement == 1.0
    assert same.max_deviation is not None and same.max_deviation < 1e-5 and same.errors == 0
    assert same.served == {"1": 40} and set(same.candidate_ms) == {"p50", "p95"} and same.recorded_ms["p50"] == 2.0
    other = replay(reg, "m", 3, cap, limit=10)
    assert other.replayed == 10 and other.agreement is not None and other.agreement < 0.9
    assert other.max_deviation is not None and other.max_deviation > 0.01
    doc = other.to_dict()
    assert doc["agreement"] == other.agreement and json.dumps(doc)


def test_dropped_inputs_are_skipped_and_a_missing_folder_says_what_to_do(reg, tmp_path):
    _capture(reg, tmp_path / "cap", 1, 5, drop=(reg.get("m", 1).signature["inputs"][0]["name"],))
    r = replay(reg, "m", 2, tmp_path / "cap")
    assert r.replayed == 0 and r.skipped == {"inputs dropped at capture (drop_inputs)": 5} and r.agreement is None
    with pytest.raises(NotFoundError, match=r"\[capture\] enabled = true"):
        replay(reg, "m", 2, tmp_path / "nowhere")


def test_the_command_renders_a_table_and_json(reg, tmp_path):
    from kit.cli import cli

    cap = tmp_path / "cap"
    _capture(reg, cap, 1, 12)
    runner = CliRunner()
    res = runner.invoke(cli, ["--registry", str(reg.root), "replay", "m@3", "--capture", str(cap), "--limit", "6"])
    assert res.exit_code == 0, res.output
    assert "agreement" in res.output and "m@3" in res.output and "replayed" in res.output
    res = runner.invoke(cli, ["--registry", str(reg.root), "replay", "m@2", "--capture", str(cap), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["agreement"] == 1.0 and doc["replayed"] == 12 and doc["version"] == 2
    res = runner.invoke(cli, ["--registry", str(reg.root), "replay", "m@2", "--capture", str(tmp_path / "x")])
    assert res.exit_code != 0 and "kit: error: No capture folder" in res.output
