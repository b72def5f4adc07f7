"""Names and versions as an attacker writes them: trailing newlines, non-ASCII digits (red-team defects)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kit.cli import cli
from kit.errors import InvalidNameError, VersionNotFoundError
from kit.registry import Registry, is_version_text, parse_ref, validate_name, validate_version
from kit.servicegen import generate, render
from kit.serving.protocol import RequestError
from kit.serving.router import choose


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


@pytest.fixture(scope="module")
def captured():
    """One capture for the module (no ONNX: nothing here serves it); each test registers it afresh."""
    from kit.capture import capture

    return capture(_small(), torch.randn(2, 4), onnx=False)


@pytest.fixture
def reg(tmp_path, captured) -> Registry:
    r = Registry(tmp_path / "reg", user="alice")
    r.register("mlp", captured)
    return r


@pytest.mark.parametrize("bad", ["nl\n", "nl\r", "svc\n", "a\tb", "mlp\u00a0", "m\u0142p", "\uff4d"])
def test_names_are_ascii_and_whole(reg, bad):
    with pytest.raises(InvalidNameError, match="Invalid model name"):
        validate_name(bad)
    with pytest.raises(InvalidNameError):
        reg.register(bad, _small(), torch.randn(2, 4))
    assert sorted(p.name for p in reg.root.iterdir() if not p.name.startswith(".")) == ["mlp"]


@pytest.mark.parametrize("bad", ["\u00b2", "\u0661", "1\u0661", "\uff11", "1\n", "\u2460", "1234567890"])
def test_versions_are_ascii_digits(reg, bad):
    assert not is_version_text(bad)
    with pytest.raises(InvalidNameError, match="positive integers"):
        validate_version(bad)
    with pytest.raises(InvalidNameError):
        parse_ref(f"mlp@{bad}")
    with pytest.raises(InvalidNameError):
        reg.get("mlp", bad)


def test_arabic_indic_one_is_not_version_one(reg):
    assert reg.get("mlp", "1").version == 1
    with pytest.raises(InvalidNameError):
        reg.resolve("mlp@\u0661")


def test_a_version_folder_with_a_non_ascii_digit_is_ignored(reg):
    (reg.root / "mlp" / "versions" / "\u00b2").mkdir()
    (reg.root / "mlp" / "versions" / "\u00b2" / "meta.json").write_text("{}")
    assert [v.version for v in reg.versions("mlp")] == [1]


@pytest.mark.parametrize("ref", ["mlp@\u00b2", "mlp@\u0661", "nl\n"])
def test_cli_show_refuses_in_one_line(reg, ref):
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "show", ref])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("kit: error: Invalid") and "Traceback" not in r.output


def test_service_names_are_checked_as_service_names(reg, tmp_path):
    with pytest.raises(InvalidNameError, match="Invalid service name 'svc\\\\n'"):
        render("svc\n", "mlp", registry="../reg")
    with pytest.raises(InvalidNameError, match="service name"):
        generate("svc\n", "mlp", registry=reg.root, out_dir=tmp_path / "services")
    assert not (tmp_path / "services").exists()
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "service", "new", "svc\n", "--model", "mlp",
                                 "--out-dir", str(tmp_path / "out")])
    assert r.exit_code == 2 and "Invalid service name" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_missing_alias_hints_are_runnable_commands(reg):
    with pytest.raises(VersionNotFoundError) as e:
        reg.get("mlp", "canary")
    assert (e.value.remedy, e.value.subject) == ("start_canary", "mlp")  # the library names the action ...
    with pytest.raises(VersionNotFoundError) as e:
        reg.get("mlp", "production")
    assert (e.value.remedy, e.value.subject) == ("promote", "mlp")
    # ... and the CLI says it as a command that runs.
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "show", "mlp@canary"])
    assert r.exit_code == 2 and r.output.rstrip().endswith("Run `kit canary mlp@N --weight 10%`."), r.output
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "show", "mlp@production"])
    assert r.exit_code == 2 and r.output.rstrip().endswith("Run `kit promote mlp@N`."), r.output
    assert r.output.count("`") == 2  # one whole command, quoted once


@pytest.mark.parametrize("override", ["\u00b2", "\u0661", "\uff11"])
def test_version_header_with_a_non_ascii_digit_is_a_400(override):
    state = SimpleNamespace(production=SimpleNamespace(version=1), canary=None, weight=0.0)
    with pytest.raises(RequestError, match="is not 'production', 'canary' or a version number"):
        choose(state, model="mlp", override=override)
