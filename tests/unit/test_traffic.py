"""kit.traffic: the one rule for canary start, re-weight, replace and stop (library level).

The faces (CLI, magics, panel, deploy) are checked against the same rule in
tests/integration/test_traffic_faces.py.
"""

from __future__ import annotations

import pytest
import torch
from kit_testing import three_versions
from torch import nn

from kit.errors import InvalidNameError, PromotionRefusedError
from kit.registry import Registry
from kit.traffic import plan_traffic, set_traffic, stop_traffic


@pytest.fixture
def reg(tmp_path) -> Registry:
    return three_versions(Registry(tmp_path / "reg", user="alice"))


def state(reg: Registry) -> tuple:
    a = reg.aliases("m")
    return a.production, a.canary, round(a.canary_weight, 4)


def test_start_reweight_replace_stop(reg):
    ch = set_traffic(reg, "m", 2, 0.1, why="try v2")
    assert ch.action == "start" and state(reg) == (1, 2, 0.1) and ch.aliases == reg.aliases("m")
    assert ch.describe() == "start a canary: v2 gets 10% of m's traffic, production v1 the rest"

    assert set_traffic(reg, "m", None, 0.3).action == "reweight" and state(reg) == (1, 2, 0.3)
    assert set_traffic(reg, "m", 2, 0.4).action == "reweight" and state(reg) == (1, 2, 0.4)

    # The rule: another version chosen while a canary runs replaces the canary, and the audit says so.
    plan = plan_traffic(reg, "m", 3, 0.2)
    assert (plan.action, plan.replaced, plan.needs_gate, plan.aliases) == ("replace", 2, True, None)
    assert "v2 gets no more traffic" in plan.describe()
    assert state(reg) == (1, 2, 0.4)  # planning moved nothing
    ch = set_traffic(reg, "m", "3", 0.2, why="v3 instead")
    assert (ch.action, ch.replaced) == ("replace", 2) and state(reg) == (1, 3, 0.2)
    ev = reg.history("m")[-1]
    assert (ev["event"], ev["version"], ev["replaced"], ev["why"]) == ("canary", 3, 2, "v3 instead")

    # Weight 0 for a version that gets no traffic changes nothing; for the canary (or none named) it stops.
    serial = reg.aliases("m").serial
    assert set_traffic(reg, "m", 2, 0.0).action == "none" and reg.aliases("m").serial == serial
    ch = set_traffic(reg, "m", 3, 0.0)
    assert (ch.action, ch.replaced) == ("stop", 3) and state(reg) == (1, None, 0.0)
    assert ch.describe() == "end canary v3: all of m's traffic to production v1"
    assert stop_traffic(reg, "m").action == "none"
    assert [e["event"] for e in reg.history("m")][-5:] == ["canary", "canary", "canary", "canary", "canary_end"]


def test_refusals_name_the_next_step_without_shell_flags(tmp_path):
    reg = Registry(tmp_path / "reg")
    torch.manual_seed(0)
    reg.register("m", nn.Linear(4, 2), torch.randn(2, 4))
    with pytest.raises(PromotionRefusedError, match="no production version") as e:
        set_traffic(reg, "m", 1, 0.1)
    assert e.value.remedy == "promote" and "--" not in str(e.value)

    three_versions(reg, "n", gated=(1, 2))
    with pytest.raises(PromotionRefusedError, match="production already"):
        set_traffic(reg, "n", 1, 0.1)
    with pytest.raises(PromotionRefusedError, match="no canary to re-weight") as e:
        set_traffic(reg, "n", None, 0.1)
    assert e.value.remedy == "start_canary"
    with pytest.raises(PromotionRefusedError, match="no passing gate") as e:
        set_traffic(reg, "n", 3, 0.1)  # starting needs the new version's gate
    assert (e.value.remedy, e.value.subject) == ("validate", "n@3") and "--" not in str(e.value)
    set_traffic(reg, "n", 2, 0.1)
    with pytest.raises(PromotionRefusedError, match="no passing gate"):
        set_traffic(reg, "n", 3, 0.1)  # ... and so does replacing
    with pytest.raises(PromotionRefusedError, match="needs a reason") as e:
        set_traffic(reg, "n", 3, 0.1, force=True)
    assert e.value.remedy == "why"
    assert set_traffic(reg, "n", 3, 0.1, force=True, why="hotfix").action == "replace"
    assert reg.history("n")[-1]["forced"] is True
    for bad in (1.5, -0.1, "lots"):
        with pytest.raises(InvalidNameError, match="Canary weight"):
            set_traffic(reg, "n", None, bad)  # type: ignore[arg-type]
