"""Kit's magics through a real IPython shell, with the real gate (papermill + kernel) behind %deploy."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from kit_testing import write_validation_notebook

from kit.config import load_config
from kit.magics import KitMagics, parse_weight
from kit.registry import Registry

MODEL = "digits"




@pytest.fixture
def shell(tmp_path: Path, registry: Registry):
    """A real InteractiveShell with Kit's magics over a temporary registry (what %load_ext kit does)."""
    ip = InteractiveShell.instance()
    # What %load_ext kit resolves (with the session's signing keys, as the registry fixture has).
    cfg = load_config(cwd=tmp_path, registry=registry.root, user="tester", gate_timeout=120.0)
    ip.register_magics(KitMagics(ip, config=cfg))
    yield ip
    for var in ("model", "x", "metrics", "deployed", "weak"):
        ip.user_ns.pop(var, None)


@pytest.fixture
def validation_nb(tmp_path: Path) -> Path:
    return write_validation_notebook(tmp_path / "validate_accuracy.ipynb")


@pytest.fixture
def with_model(shell, digits_model):
    model, split, acc = digits_model
    import torch

    shell.user_ns.update(model=model, x=torch.from_numpy(split.x_test[:4]), metrics={"accuracy": acc})
    return shell


def run(ip: InteractiveShell, line: str):
    result = ip.run_cell(line, store_history=False)
    return result, result.error_before_exec or result.error_in_exec


def assert_usage_error(ip: InteractiveShell, capsys, line: str, *needles: str) -> str:
    _, err = run(ip, line)
    captured = capsys.readouterr()
    assert type(err) is UsageError, f"{line!r} raised {err!r}, expected exactly IPython's UsageError"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert "UsageError:" in captured.err
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {str(err)!r}"
    return str(err)


def test_load_ext_registers_the_magics(tmp_path, monkeypatch):
    ip = InteractiveShell.instance()
    monkeypatch.setenv("KIT_REGISTRY", str(tmp_path / "reg"))
    ip.run_line_magic("load_ext", "kit")
    for name in ("deploy", "models", "promote", "canary", "rollback", "registry"):
        assert ip.find_line_magic(name) is not None, name


def test_deploy_help(shell, capsys):
    shell.run_cell("%deploy?", store_history=False)
    out = capsys.readouterr().out
    for needle in ("%deploy", "--example", "--name", "--validate", "--canary", "--promote", "--service"):
        assert needle in out


def test_user_errors_are_usage_errors(with_model, capsys, registry):
    ip = with_model
    assert_usage_error(ip, capsys, "%deploy", "MODEL", "--example", "--name")
    assert_usage_error(ip, capsys, "%deploy nope --example x --name digits", "'nope'", "NameError")
    assert_usage_error(ip, capsys, "%deploy [1,2] --example x --name digits", "torch.nn.Module")
    assert_usage_error(ip, capsys, "%deploy model --example 'text' --name digits", "tensor")
    assert_usage_error(ip, capsys, "%deploy model --example x --name ../etc", "Invalid model name")
    assert_usage_error(ip, capsys, "%deploy model --example x --name digits --promote --canary 10%", "not both")
    assert_usage_error(ip, capsys, "%deploy model --example x --name digits --canary 150", "150%")
    assert_usage_error(ip, capsys, "%deploy model --example x --name digits --param nonsense", "key=value")
    assert_usage_error(ip, capsys, "%deploy model --example x --name digits --validate missing.ipynb", "missing.ipynb")
    # --canary without a production version is refused before anything is captured or registered.
    assert_usage_error(ip, capsys, "%deploy model --example x --name digits --canary 10%",
                       "no production", "Promote a version first", "%promote digits@N")
    assert registry.models() == []
    assert_usage_error(ip, capsys, "%canary nothing 10%", "No model 'nothing'")
    assert_usage_error(ip, capsys, "%rollback nothing", "No model 'nothing'")
    assert_usage_error(ip, capsys, "%promote nothing", "which version")
    assert_usage_error(ip, capsys, "%registry", "name a model")


def test_deploy_takes_a_dict_example_passed_by_keyword(shell, capsys, registry):
    """A tokenizer's output (a dict) as --example: the keys name the inputs, bound by keyword."""
    import torch
    from torch import nn

    class ByName(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids, past=None, attention_mask=None):
            return self.emb(input_ids).mean(1) * attention_mask[:, :1]

    shell.user_ns.update(model=ByName(), batch={"input_ids": torch.randint(0, 10, (2, 5)),
                                                "attention_mask": torch.ones(2, 5)})
    _, err = run(shell, "deployed = %deploy model --example batch --name byname --no-onnx")
    assert err is None, (err, capsys.readouterr())
    assert list(shell.user_ns["deployed"].steps[0].parts) == ["torch.export", "parity"]  # no ONNX step
    mv = registry.get("byname", 1)
    assert [s["name"] for s in mv.signature["inputs"]] == ["input_ids", "attention_mask"]
    for var in ("model", "batch"):
        shell.user_ns.pop(var, None)


def test_parse_weight():
    assert parse_weight("10%") == pytest.approx(0.1)
    assert parse_weight("0.25") == pytest.approx(0.25)
    assert parse_weight("100%") == 1.0
    for bad in ("150", "abc", "-5%", "101%"):
        with pytest.raises(ValueError):
            parse_weight(bad)


def test_deploy_promote_canary_rollback(with_model, capsys, registry, validation_nb, digits_model):
    ip = with_model
    nb = str(validation_nb)
    result, err = run(ip, f"deployed = %deploy model --example x --name {MODEL} --metrics metrics "
                          f"--validate {nb} --promote")
    out = capsys.readouterr().out
    assert err is None, out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split()[1] for ln in lines] == ["capture", "register", "gate", "alias", "service"], out
    assert all(" ok " in ln for ln in lines), out
    assert str(registry.version_dir(MODEL, 1)) in lines[1]
    assert "report.html" in lines[2] and "production - -> 1" in lines[3]
    # capture's and register's own steps, each with its seconds, on their step lines and in the result
    assert re.search(r"\(torch\.export \d+\.\ds, parity \d+\.\ds, onnx \d+\.\ds\)$", lines[0]), lines[0]
    assert re.search(r"\(save \d+\.\ds, hash \d+\.\ds, publish \d+\.\ds\)  -> ", lines[1]), lines[1]
    deployed = ip.user_ns["deployed"]
    assert [list(s.parts) for s in deployed.steps[:2]] == [["torch.export", "parity", "onnx"],
                                                           ["save", "hash", "publish"]]
    assert deployed.version.version == 1 and deployed.gate.passed
    assert Path(deployed.gate.report).is_file()
    assert registry.aliases(MODEL).production == 1
    mv = registry.get(MODEL, 1)
    assert mv.source.get("via") == "%deploy" and mv.metrics["accuracy"] == pytest.approx(digits_model[2])
    assert registry.passing_gate(mv) is not None

    # A second version as a canary, then the small magics move it around.
    _, err = run(ip, f"%deploy model --example x --name {MODEL} --metrics metrics --validate {nb} --canary 20%")
    assert err is None, capsys.readouterr()
    a = registry.aliases(MODEL)
    assert (a.production, a.canary, a.canary_weight) == (1, 2, pytest.approx(0.2))
    capsys.readouterr()

    _, err = run(ip, f"%canary {MODEL} 50%")
    assert err is None and registry.aliases(MODEL).canary_weight == pytest.approx(0.5)
    assert "canary=2 at 50%" in capsys.readouterr().out

    _, err = run(ip, f"%models {MODEL}")
    out = capsys.readouterr().out
    assert err is None and "canary 50%" in out and "production" in out and "passed" in out

    _, err = run(ip, f"%promote {MODEL}@2 --why 'canary looked good'")
    assert err is None and registry.aliases(MODEL).production == 2 and registry.aliases(MODEL).canary is None
    _, err = run(ip, f"%rollback {MODEL} --why 'test'")
    assert err is None and registry.aliases(MODEL).production == 1
    rollback = [e for e in registry.history(MODEL) if e["event"] == "rollback"]
    assert rollback and rollback[-1]["why"] == "test" and rollback[-1]["user"] == "tester"
    capsys.readouterr()
    _, err = run(ip, "%models")
    assert err is None and MODEL in capsys.readouterr().out


def test_deploy_stops_at_a_failing_gate(with_model, capsys, registry, validation_nb):
    ip = with_model
    msg = assert_usage_error(
        ip, capsys,
        f"%deploy model --example x --name {MODEL} --metrics metrics --validate {validation_nb} "
        f"--param min_accuracy=1.01 --promote",
        "stopped at step 3/5 (gate)", "FAILED validation", "accuracy", "Report: ")
    report = Path(msg.split("Report: ", 1)[1].strip())
    assert report.is_file() and report.name == "report.html"
    # The version exists (registered, with its failed gate as evidence) but nothing moved.
    assert [mv.version for mv in registry.versions(MODEL)] == [1]
    assert registry.aliases(MODEL).production is None
    assert registry.gate_results(MODEL, 1)[-1]["passed"] is False
    # The promote rule holds for the magics too.
    assert_usage_error(ip, capsys, f"%promote {MODEL}@1", "no passing gate")


def test_a_usage_error_stops_a_papermill_run(tmp_path, kit_env, monkeypatch):
    """Under papermill (CI), a %deploy user error fails the run at that cell, with IPython's one-line message."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    monkeypatch.setenv("KIT_REGISTRY", kit_env["KIT_REGISTRY"])
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext kit"),
                nbformat.v4.new_code_cell("%deploy undefined_model --example x --name digits --promote"),
                nbformat.v4.new_code_cell("reached = True")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = tmp_path / "deploy_error.ipynb", tmp_path / "deploy_error.out.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(src), str(out), kernel_name="python3", cwd=str(tmp_path),
                                   progress_bar=False, execution_timeout=120)
    assert info.value.exec_count == 2
    executed = nbformat.read(out, as_version=4)
    assert executed.cells[-1].execution_count is None  # the run stopped at %deploy
    cell = next(c for c in executed.cells if c.source.startswith("%deploy"))  # papermill adds a banner cell
    shown = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    assert "UsageError: %deploy: could not evaluate MODEL 'undefined_model'" in shown, cell.outputs
    assert "Traceback" not in shown
