"""`kit cache` / `kit cache prune`: list and bound the local verified cache loads read from."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kit.cli import cli
from kit.cli.cache_cmds import parse_age
from kit.errors import ConfigError
from kit.registry import Registry
from kit.signing import Keyring


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


@pytest.fixture
def loaded_twice(tmp_path, monkeypatch):
    """m@1 and m@2 loaded (so both are cached); production is 2."""
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KIT_KEYS_DIR", str(tmp_path / "keys"))
    reg = Registry(tmp_path / "reg", user="alice", keyring=Keyring(tmp_path / "keys"),
                   cache_dir=tmp_path / "cache" / "versions")
    for seed in (1, 2):
        mv = reg.register("m", _model(seed), torch.ones(1, 4))
        reg.load("m", mv.version)
    reg.promote("m", 2, force=True, why="test")
    return reg


def _kit(reg: Registry, *args: str) -> dict:
    out = CliRunner().invoke(cli, ["--registry", str(reg.root), "cache", *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_cache_lists_and_prune_keeps_aliased_versions(loaded_twice):
    reg = loaded_twice
    listed = _kit(reg, "ls")
    assert len(listed["entries"]) == 2 and listed["bytes"] > 0
    assert _kit(reg, "prune")["removed"] == []  # both used just now: younger than a day
    removed = _kit(reg, "prune", "--unused-for", "0s")["removed"]
    prod = reg.get("m", 2).artifact_sha256
    assert len(removed) == 1 and not removed[0].startswith(prod)  # production's copy stays
    assert [e["artifact_sha256"] for e in _kit(reg, "ls")["entries"]] == [prod]
    assert len(_kit(reg, "prune", "--all", "--unused-for", "0")["removed"]) == 1
    assert reg.load("m", 2) is not None  # the next load copies it again


def test_a_bad_duration_is_one_line_naming_the_forms():
    assert parse_age("7d") == 7 * 86400 and parse_age("90") == 90
    with pytest.raises(ConfigError, match="90s, 30m, 12h or 7d"):
        parse_age("3x")
