"""kit pack's staging of a model (kit.pack.stage): the aliases.json and move records staged are the bytes the
plan verified, read once, so a move made between the plan and the staging cannot make an archive whose
aliases name a version it does not ship."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kit.errors import PackError
from kit.pack.stage import MoveSnapshot, ServiceInfo, plan_models, stage_models
from kit.registry import Registry
from kit.signing import Keyring


def _tiny(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).eval(), torch.randn(2, 3)


def test_a_move_between_plan_and_stage_does_not_reach_the_archive(tmp_path: Path, keyring):
    reg = Registry(tmp_path / "reg", keyring=keyring)
    for seed in (1, 2, 3):
        reg.register("lin", *_tiny(seed), onnx=False, progress=False)
    reg.promote("lin", 1, force=True, why="first")
    svc = ServiceInfo("svc", "lin", tmp_path / "reg", tmp_path / "svc")
    plan = plan_models(svc, svc.registry, keyring)
    assert (plan.versions, plan.aliases.production, plan.aliases.canary) == ([1], 1, None)
    planned = (tmp_path / "reg" / "lin" / "aliases.json").read_bytes()

    # another writer moves the aliases after the plan verified them, before the staging
    reg.promote("lin", 2, force=True, why="meanwhile")
    reg.set_canary("lin", 3, 0.5, force=True, why="meanwhile")
    assert (tmp_path / "reg" / "lin" / "aliases.json").read_bytes() != planned

    stage_models(plan, tmp_path / "stage")
    staged = tmp_path / "stage" / "lin"
    assert (staged / "aliases.json").read_bytes() == planned  # the verified bytes, not the registry's new ones
    assert sorted(p.name for p in (staged / "moves").iterdir()) == ["00000001.json"]  # no newer record to follow
    assert sorted(p.name for p in (staged / "versions").iterdir()) == ["1"]
    shipped = Registry(tmp_path / "stage", keyring=Keyring.verify_only(keyring.trust()),
                       cache_dir=tmp_path / "server-cache")  # as the archive's server opens it
    a = shipped.aliases("lin")
    assert (a.production, a.canary) == (1, None)
    assert [r.ok for r in shipped.verify("lin")] == [True]
    model, x = _tiny(1)
    torch.testing.assert_close(shipped.load("lin", "production").module(x), model(x))


def test_the_snapshot_is_read_once_and_read_only(tmp_path: Path, keyring):
    reg = Registry(tmp_path / "reg", keyring=keyring)
    reg.register("lin", *_tiny(1), onnx=False, progress=False)
    reg.promote("lin", 1, force=True, why="first")
    snap = MoveSnapshot(reg.movelog("lin").storage)
    reg.register("lin", *_tiny(2), onnx=False, progress=False)
    reg.promote("lin", 2, force=True, why="second")
    assert snap.serials() == [1] and snap.read(2) is None and snap.read_pointer() == snap.read(1)
    with pytest.raises(PackError, match="read-only"):
        snap.create(2, b"{}")
