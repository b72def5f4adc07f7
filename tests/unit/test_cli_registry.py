"""The registry commands of `kit`, through click's runner (no subprocess)."""

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
    r = Registry(tmp_path / "reg", keyring=project_keyring())  # signed, as `kit` (which verifies) expects
    for s in range(2):
        torch.manual_seed(s)
        r.register("m", nn.Linear(4, 2), torch.randn(1, 4), metrics={"acc": 0.9 + s / 100})
    return r


def run(reg: Registry, *args: str):
    return CliRunner().invoke(cli, ["--registry", str(reg.root), *args], catch_exceptions=False)


def test_models_and_versions_tables(reg):
    out = run(reg, "models").output
    assert "MODEL" in out and "m " in out
    out = run(reg, "models", "m").output
    assert "acc=0.9" in out and "VERSION" in out
    rows = json.loads(run(reg, "models", "m", "--json").output)
    assert [r["version"] for r in rows] == [1, 2]
    assert "BACKENDS" in out and all(r["backends"][0] == "torch" for r in rows)
    shown = json.loads(run(reg, "show", "m@1", "--json").output)
    assert set(shown["backends"]) | set(shown["missing_backends"]) == {"torch", "onnxruntime"}
    assert "backends:   torch" in run(reg, "show", "m@1").output


def test_show_verify_history_env(reg):
    out = run(reg, "show", "m@1").output
    assert "signature:  (input: float32[batch, 4])" in out
    assert json.loads(run(reg, "show", "m@latest", "--json").output)["version"] == 2
    res = run(reg, "verify")
    assert res.exit_code == 0 and "2 of 2 versions verified" in res.output
    assert "register" in run(reg, "history", "m").output
    res = run(reg, "env", "--diff", "m@1")
    assert res.exit_code == 0 and "No drift" in res.output


def test_promote_canary_rollback_through_the_cli(reg):
    res = run(reg, "promote", "m@1")
    assert res.exit_code == 2 and res.output.startswith("kit: error: Refusing to promote m@1")
    assert run(reg, "promote", "m@1", "--force", "--why", "first").exit_code == 0
    res = run(reg, "canary", "m@2", "--weight", "10%", "--force", "--why", "try")
    assert res.exit_code == 0 and "canary=2 at 10%" in res.output
    assert "canary=2 at 50%" in run(reg, "canary", "m", "--weight", "0.5").output
    res = run(reg, "canary", "m", "--weight", "lots")
    assert res.exit_code == 2 and "not a number" in res.output
    assert "production=1" in run(reg, "canary", "m", "--stop").output
    run(reg, "promote", "m@2", "--force", "--why", "second")
    assert "production=1" in run(reg, "rollback", "m", "--why", "oops").output
    hist = json.loads(run(reg, "history", "m", "--json").output)
    assert [e["event"] for e in hist][-2:] == ["promote", "rollback"]
    assert "FORCED" in run(reg, "history", "m").output
    assert run(reg, "history", "m").exit_code == 0
    newest = sorted((reg.model_dir("m") / "moves").glob("*.json"))[-1]
    newest.write_bytes(newest.read_bytes().replace(b"oops", b"OOPS"))  # a writer without the key edits a record
    res = run(reg, "history", "m")
    assert res.exit_code == 1 and "REFUSED" in res.output and "failed verification" in res.output, res.output


@pytest.mark.parametrize("args,needle", [
    (["show", "m@7"], "has no version 7 (have 1-2)"),
    (["show", "../../etc@1"], "Invalid model name"),
    (["show", "nope"], "No model 'nope'"),
    (["rollback", "m"], "no previous production"),
])
def test_errors_are_one_line_with_the_next_step(reg, args, needle):
    res = run(reg, *args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kit: error: ") and needle in lines[0]


def test_verify_fails_on_tampering_and_corrupt_aliases_is_clear(reg):
    p = reg.version_dir("m", 2) / "example.npz"
    p.write_bytes(p.read_bytes() + b"x")
    res = run(reg, "verify")
    assert res.exit_code == 1 and "BAD m@2" in res.output and "1 version(s) failed" in res.output
    reg.aliases_path("m").write_text("{trunc")
    res = run(reg, "show", "m")
    assert res.exit_code == 2 and "kit aliases repair m" in res.output
    assert run(reg, "aliases", "repair", "m").exit_code == 0
