"""Where gate parameters come from: kit.toml's [gate] table, under `-p`; no absolute latency budget by default.

No kernel starts here: what is checked is what run_gate refuses before it starts one.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from kit.cli import cli
from kit.config import load_config
from kit.errors import ConfigError
from kit.gate import AUTO_PARAMS, DEFAULT_NOTEBOOK, declared_params

ROOT_NB = DEFAULT_NOTEBOOK.parents[3] / "tests" / "notebooks" / "gate" / "passes.ipynb"


def test_the_gate_table_of_kit_toml_is_read(tmp_path):
    (tmp_path / "kit.toml").write_text('[gate]\nmax_p95_ms_batch1 = 50.0\ncheck_budget_s = 300\n')
    cfg = load_config(cwd=tmp_path, environ={})
    assert cfg.gate == {"max_p95_ms_batch1": 50.0, "check_budget_s": 300}
    (tmp_path / "kit.toml").write_text('gate = "fast"\n')
    with pytest.raises(ConfigError, match=r"\[gate\] must be a table of notebook parameters"):
        load_config(cwd=tmp_path, environ={})


def test_the_default_notebook_has_no_absolute_latency_budget():
    declared = declared_params(DEFAULT_NOTEBOOK)
    assert declared["max_p95_ms_batch1"]["default"] == "None"
    assert declared["max_p95_ms_batch_n"]["default"] == "None"
    assert declared["max_latency_ratio"]["default"] == "1.25"
    assert declared["check_budget_s"]["default"] == "120.0"
    assert "production_version" in AUTO_PARAMS and declared["production_version"]["default"] == "None"


def test_kit_validate_passes_the_gate_table_and_refuses_before_a_kernel(tmp_path, monkeypatch):
    from kit_testing import project_keyring

    from kit.registry import Registry

    reg = Registry(tmp_path / "registry", keyring=project_keyring())
    reg.register("lin", torch.nn.Linear(4, 2).eval(), torch.randn(2, 4), onnx=False)
    (tmp_path / "kit.toml").write_text('registry = "registry"\n[gate]\ntreshold = 0.5\n')
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    r = run(cli, ["validate", "lin@1", "--notebook", str(ROOT_NB)])
    # the [gate] table reached the gate: the notebook does not declare it, so nothing ran
    assert r.exit_code == 2 and "passes.ipynb does not declare parameter(s) treshold" in r.output
    r = run(cli, ["validate", "lin@1", "--notebook", str(ROOT_NB), "-p", "production_version=1"])
    assert r.exit_code == 2 and "Don't pass production_version: the gate sets them itself" in r.output
    gates = tmp_path / "registry" / "lin" / "versions" / "1" / "gates"
    assert not gates.exists() or not any(gates.iterdir())
    r = run(cli, ["validate", "lin@1", "--backend", "onnxruntime", "--json"])
    assert r.exit_code == 2 and "lin@1 has no model.onnx, so it cannot be gated on onnxruntime" in r.output
    assert r.output.startswith("kit: error: ")  # refused: no result printed
