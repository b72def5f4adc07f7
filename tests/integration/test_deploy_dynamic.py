"""``%deploy --dynamic`` and ``deploy(dynamic=...)``: named dims travel from the shell to the signature,
through a real IPython shell and the real gate (papermill + kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from kit_testing import write_validation_notebook
from zoo.models import ZOO

from kit.config import load_config
from kit.magics import KitMagics

TEXT = next(z for z in ZOO if z.name == "zoo-text")


@pytest.fixture
def shell(tmp_path: Path, registry):
    ip = InteractiveShell.instance()
    cfg = load_config(cwd=tmp_path, registry=registry.root, user="tester", gate_timeout=120.0)
    ip.register_magics(KitMagics(ip, config=cfg))
    ids, mask = TEXT.example()
    ip.user_ns.update(tm=TEXT.model(), ex=(ids, mask), metrics={"accuracy": 1.0})
    yield ip
    for var in ("tm", "ex", "metrics", "deployed"):
        ip.user_ns.pop(var, None)


def test_deploy_dynamic_reaches_the_signature(shell, registry, tmp_path):
    nb = write_validation_notebook(tmp_path / "validate.ipynb")
    line = (f"deployed = %deploy tm --example ex --name text --metrics metrics --validate {nb} "
            "--dynamic ids:1=seq --dynamic mask:1=seq:1..128")
    result = shell.run_cell(line, store_history=False)
    assert result.error_in_exec is None and result.error_before_exec is None, result.error_in_exec
    assert shell.user_ns["deployed"].gate.passed
    mv = registry.get("text", 1)
    assert mv.signature["dims"] == {"batch": {"min": 1, "max": 4096}, "seq": {"min": 1, "max": 128}}
    assert [s["shape"] for s in mv.signature["inputs"]] == [["batch", "seq"], ["batch", "seq"]]
    assert mv.capture["parity"]["dims"] == {"seq": [12, 15]}
    loaded = registry.load("text", 1)
    ids, mask = TEXT.inputs(2, 30, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), TEXT.model()(ids, mask))


@pytest.mark.parametrize("flag, needle", [
    ("--dynamic ids=seq", "INPUT:DIM=NAME"),
    ("--dynamic nope:1=seq", "model's inputs are ['ids', 'mask']"),
    ("--dynamic ids:1=seq --dynamic mask:1=len", "must share one name"),
])
def test_bad_dynamic_flags_are_one_line_usage_errors(shell, flag, needle, capsys):
    result = shell.run_cell(f"%deploy tm --example ex --name text {flag}", store_history=False)
    err = result.error_in_exec or result.error_before_exec
    assert type(err) is UsageError and needle in str(err), err
    assert "Traceback" not in capsys.readouterr().err
