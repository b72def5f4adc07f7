"""One traffic rule through every face: `kit canary` (click), `%canary` (a real IPython shell), the panel.

The state each face starts from: production v1, canary v2 at 20%, v3 registered with a passing gate.
Choosing v3 replaces the canary (v2 gets no traffic; the audit event says `replaced: 2`); naming no
version re-weights the canary; 0% or stop ends it. The rule itself is kit.traffic (tests/unit/test_traffic.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from kit_testing import three_versions

from kit.cli import cli
from kit.config import load_config
from kit.magics import KitMagics
from kit.registry import Registry
from kit.traffic import set_traffic
from kit.widgets import RegistryPanel


@pytest.fixture
def reg(registry: Registry) -> Registry:
    """The conftest registry (signed as in production, where that is on)."""
    reg = three_versions(registry)
    set_traffic(reg, "m", 2, 0.2, why="start")
    return reg


def state(reg: Registry) -> tuple:
    a = reg.aliases("m")
    return a.production, a.canary, round(a.canary_weight, 4)


def replaced_in_audit(reg: Registry) -> tuple:
    ev = reg.history("m")[-1]
    return ev["event"], ev["version"], ev.get("replaced")


def test_cli(reg):
    def kit(*args: str):
        return CliRunner().invoke(cli, ["--registry", str(reg.root), *args], catch_exceptions=False)

    res = kit("canary", "m@3", "--weight", "10%")
    assert res.exit_code == 0, res.output
    assert "replace canary v2 with v3 at 10%: v2 gets no more traffic" in res.output
    assert state(reg) == (1, 3, 0.1) and replaced_in_audit(reg) == ("canary", 3, 2)
    assert "replaced=2" in kit("history", "m").output

    assert "re-weight canary v3 to 30%" in kit("canary", "m", "--weight", "0.3").output
    assert state(reg) == (1, 3, 0.3)
    res = kit("canary", "m@1", "--weight", "5%")
    assert res.exit_code == 2 and "production already" in res.output and state(reg) == (1, 3, 0.3)
    assert "end canary v3" in kit("canary", "m", "--stop").output and state(reg) == (1, None, 0.0)
    # The library says what to do; the CLI adds its own command for it.
    res = kit("canary", "m", "--weight", "10%")
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "kit: error: Model 'm' has no canary to re-weight. Name the version to start one with. "
        "Run `kit canary m@N --weight 10%`."]


@pytest.fixture
def shell(tmp_path: Path, reg: Registry):
    ip = InteractiveShell.instance()
    cfg = load_config(cwd=tmp_path, registry=reg.root, user="tester")  # what %load_ext kit resolves
    ip.register_magics(KitMagics(ip, config=cfg))
    return ip


def magic(ip: InteractiveShell, line: str):
    res = ip.run_cell(line, store_history=False)
    return res.error_before_exec or res.error_in_exec


def test_magics(shell, reg, capsys):
    assert magic(shell, "%canary m@3 10%") is None
    assert "replace canary v2 with v3 at 10%" in capsys.readouterr().out
    assert state(reg) == (1, 3, 0.1) and replaced_in_audit(reg) == ("canary", 3, 2)
    assert magic(shell, "%canary m 30%") is None and state(reg) == (1, 3, 0.3)
    assert magic(shell, "%canary m 0%") is None and state(reg) == (1, None, 0.0)
    err = magic(shell, "%canary m 10%")
    assert type(err) is UsageError and "%canary m@N 10%" in str(err) and "--weight" not in str(err)
    assert magic(shell, "%models m") is None
    out = capsys.readouterr().out
    assert "m: production=1" in out and "production" in out and "passed" in out


def test_panel_says_it_replaces_before_it_does(reg):
    panel = RegistryPanel(reg, "m", user="tester")
    panel.version.value = 3
    assert "replaces canary v2 with v3" in panel.canary_label.value
    assert panel.canary.value == 0.0 and state(reg) == (1, 2, 0.2)  # v3's share: none yet; nothing moved
    panel.canary.value = 0.1
    assert "kit-error" not in panel.status.value, panel.status.value
    assert state(reg) == (1, 3, 0.1) and replaced_in_audit(reg) == ("canary", 3, 2)
    assert "replace canary v2 with v3" in panel.status.value and "kit-b-canary" in panel.table.value

    assert panel.version.value == 3 and panel.canary.value == pytest.approx(0.1)
    panel.canary.value = 0.3  # the selected version is the canary: re-weight
    assert state(reg) == (1, 3, 0.3) and "re-weight canary v3" in panel.status.value
    panel.version.value = 1  # production: the slider cannot make it a canary, and the label says why
    assert panel.canary.disabled and "Select another version" in panel.canary_label.value
    panel.stop_button.click()
    assert state(reg) == (1, None, 0.0) and "end canary v3" in panel.status.value
    assert panel.stop_button.disabled


def test_panel_refuses_a_move_on_a_split_it_did_not_show(reg):
    panel = RegistryPanel(reg, "m", user="tester")
    panel.version.value = 2
    assert "re-weight" in panel.canary_label.value  # v2 is the canary the panel shows
    set_traffic(reg, "m", 3, 0.5, why="someone else, from the CLI")  # behind the panel's back
    panel.canary.value = 0.4  # would now replace v3 with v2: not what the person was shown
    assert "kit-error" in panel.status.value and "changed since it was shown" in panel.status.value
    assert state(reg) == (1, 3, 0.5)
    assert "replaces canary v3 with v2" in panel.canary_label.value  # redrawn: the next move is informed
    panel.canary.value = 0.4
    assert state(reg) == (1, 2, 0.4) and replaced_in_audit(reg) == ("canary", 2, 3)


def test_deploy_with_a_canary_running_replaces_it(reg, tmp_path):
    """deploy(canary=...) registers v4, runs the real gate (papermill), then applies the same rule."""
    import torch
    from kit_testing import write_validation_notebook
    from torch import nn

    from kit.deploy import deploy

    nb = write_validation_notebook(tmp_path / "validate.ipynb")
    torch.manual_seed(4)
    result = deploy(reg, nn.Linear(4, 2), torch.randn(2, 4), "m", notebooks=[nb], metrics={"accuracy": 0.9},
                    canary=0.15, project_root=tmp_path, gate_timeout=120, user="tester")
    assert result.version is not None and result.version.version == 4
    assert state(reg) == (1, 4, 0.15) and replaced_in_audit(reg) == ("canary", 4, 2)
    alias_step = [s for s in result.steps if s.name == "alias"][0]
    assert "replace canary v2 with v4 at 15%: v2 gets no more traffic" in alias_step.detail


def test_panel_says_when_the_chosen_version_needs_its_gate(registry):
    reg = three_versions(registry, gated=(1, 2))
    set_traffic(reg, "m", 2, 0.2)
    panel = RegistryPanel(reg, "m", user="tester")
    panel.version.value = 3
    assert "replaces canary v2 with v3" in panel.canary_label.value
    assert "needs a passing gate first: click Validate on v3" in panel.canary_label.value
    panel.canary.value = 0.1  # refused by the gate rule, shown red; the canary stays
    assert "kit-error" in panel.status.value and "no passing gate" in panel.status.value
    assert "The Validate button runs the gate" in panel.status.value and state(reg) == (1, 2, 0.2)
    panel.version.value = 2
    assert "needs a passing gate" not in panel.canary_label.value  # re-weighting needs none
