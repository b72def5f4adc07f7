"""Every state-changing registry command takes --json (one JSON object on stdout); `kit rollback` during a
canary with no previous production ends the canary and says so."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from kit_testing import project_keyring
from torch import nn

from kit.cli import cli
from kit.registry import Registry


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(tmp_path / "reg", keyring=project_keyring())
    for s in range(2):
        torch.manual_seed(s)
        r.register("m", nn.Linear(4, 2), torch.randn(1, 4))
    return r


def run_json(reg: Registry, *args: str) -> dict:
    res = CliRunner().invoke(cli, ["--registry", str(reg.root), *args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)  # one object, nothing else on stdout


def test_moves_print_one_json_object(reg):
    out = run_json(reg, "promote", "m@1", "--force", "--why", "first")
    assert out["action"] == "promote" and out["aliases"]["production"]["version"] == 1 and out["forced"] is True
    assert out["signed_by"] and out["serial"] == 1
    out = run_json(reg, "canary", "m@2", "--weight", "10%", "--force", "--why", "try")
    assert out["action"] == "canary_start" and out["aliases"]["canary"] == {"version": 2, "weight": 0.1}
    out = run_json(reg, "canary", "m", "--stop")
    assert out["action"] == "canary_stop" and "canary" not in out["aliases"]
    run_json(reg, "promote", "m@2", "--force", "--why", "second")
    out = run_json(reg, "rollback", "m", "--why", "oops")
    assert out["aliases"]["production"]["version"] == 1 and out["from_version"] == 2
    assert out["only_ended_canary"] is False and out["note"] is None
    (reg.root / "m" / "aliases.json").write_text("{}")
    out = run_json(reg, "aliases", "repair", "m")
    assert out["action"] == "aliases_repair" and out["aliases"]["production"]["version"] == 1


def test_keys_sign_prints_json(reg):
    out = run_json(reg, "keys", "sign", "m@1")
    assert out["signed"] == "m@1" and out["key_id"]


def test_migrate_with_json_needs_yes(reg):
    res = CliRunner().invoke(cli, ["--registry", str(reg.root), "aliases", "migrate", "m", "--json"])
    assert res.exit_code == 2 and "--json --yes" in res.output


def test_rollback_during_a_canary_without_previous_production_ends_the_canary(reg):
    run_json(reg, "promote", "m@1", "--force", "--why", "first")
    run_json(reg, "canary", "m@2", "--weight", "50%", "--force", "--why", "try")
    res = CliRunner().invoke(cli, ["--registry", str(reg.root), "rollback", "m", "--why", "incident"])
    assert res.exit_code == 0, res.output
    assert "no previous production to roll back to: ended the canary v2; production stays v1" in res.output
    a = reg.aliases("m")
    assert (a.production, a.canary) == (1, None)
    # nothing left to end: refused, as before
    res = CliRunner().invoke(cli, ["--registry", str(reg.root), "rollback", "m"])
    assert res.exit_code == 2 and "no previous production" in res.output


def test_rollback_json_says_it_only_ended_the_canary(reg):
    run_json(reg, "promote", "m@1", "--force", "--why", "first")
    run_json(reg, "canary", "m@2", "--weight", "50%", "--force", "--why", "try")
    out = run_json(reg, "rollback", "m", "--why", "incident")
    assert out["only_ended_canary"] is True and out["ended_canary"] == 2 and out["version"] == 1
    assert "ended the canary v2" in out["note"]
