"""Progress of capture and register (kit.progress): the steps in order, their seconds kept, each face's sink;
and Registry(path) signing with the user's key unless told keyring=None (issue 19)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kit.capture import capture
from kit.errors import ConfigError, SigningKeyError
from kit.progress import Steps, begin_line, end_line
from kit.registry import Registry

CAPTURE = ["torch.export", "parity"]
REGISTER = ["save", "hash", "publish"]


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(3, 2), torch.randn(2, 3)


def _said(lines: list[str]) -> tuple[list[str], list[str]]:
    """The steps begun and ended, in the order said (the gate's begin and end lines)."""
    begun = [m.group(1) for ln in lines if (m := re.fullmatch(r"  … (\S+)(?: \(.*\))?", ln))]
    ended = [m.group(1) for ln in lines if (m := re.fullmatch(r"    (\S+): [0-9.e-]+s", ln))]
    return begun, ended


@pytest.mark.parametrize("onnx", [True, False])
def test_register_says_its_steps_in_order_and_keeps_their_seconds(registry, capsys, onnx):
    lines: list[str] = []
    mv = registry.register("lin", *_tiny(), onnx=onnx, progress=lines.append)
    want = CAPTURE + (["onnx"] if onnx else []) + REGISTER
    begun, ended = _said(lines)
    assert begun == want and ended == want, lines
    assert len(lines) == 2 * len(want)  # nothing but begin and end lines
    steps = mv.capture["steps"]  # every step before publish (which writes this record), in meta.json
    assert set(steps) == set(want[:-1]) and all(isinstance(s, float) and s >= 0 for s in steps.values())
    assert steps["torch.export"] > 0
    assert capsys.readouterr().err == ""  # a callable sink: nothing on stderr


def test_the_default_is_one_stderr_line_per_step_and_false_is_silent(registry, capsys):
    model, x = _tiny()
    cm = capture(model, x, onnx=False)  # default progress: stderr, one line as each step ends
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(": ")[1].split()[0] for ln in err] == CAPTURE, err
    assert all(re.fullmatch(r"kit capture Linear: \S+ \d+\.\ds", ln) for ln in err), err
    assert list(cm.steps) == CAPTURE

    registry.register("lin", cm)
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith("kit register lin: ")] == err and len(err) == len(REGISTER), err

    mv = registry.register("lin", capture(model, x, onnx=False, progress=False), progress=False)
    assert capsys.readouterr().err == ""
    assert set(mv.capture["steps"]) == {*CAPTURE, *REGISTER[:-1]}


def test_a_failing_step_says_so_and_a_broken_sink_never_breaks_the_call(capsys):
    lines: list[str] = []
    steps = Steps(lines.append, "test")
    with pytest.raises(ValueError), steps.step("boom"):
        raise ValueError("x")
    assert lines[0] == begin_line("boom") and lines[1].startswith("    boom: ") and lines[1].endswith("(failed)")
    assert "boom" in steps.seconds

    def broken(line: str) -> None:
        raise RuntimeError("sink down")

    steps = Steps(broken, "test")
    with steps.step("a"):
        pass
    with steps.step("b"):
        pass
    assert list(steps.seconds) == ["a", "b"]
    assert end_line("a", 1.5) == "    a: 1.5s" and begin_line("a", "budget 3s") == "  … a (budget 3s)"


class _Handle:
    def __init__(self, shown: list[str]) -> None:
        self.shown = shown

    def update(self, bundle: dict[str, str], raw: bool = False) -> None:
        self.shown.append(bundle["text/plain"])


def test_deploy_step_line_in_a_notebook_shows_the_running_steps_parts(registry, monkeypatch):
    """%deploy's printer (a kernel's display stands in for the notebook front end): while capture and then
    register run, the running step's line names the step and its part now running."""
    import IPython.display

    from kit.deploy import Step
    from kit.magics import _StepPrinter

    shown: list[str] = []

    def display(bundle: dict[str, str], raw: bool = False, display_id: bool = False) -> _Handle:
        shown.append(bundle["text/plain"])
        return _Handle(shown)

    monkeypatch.setattr(IPython.display, "display", display)
    printer = _StepPrinter(type("Kernel", (), {"kernel": object()})())
    cm = capture(*_tiny(), onnx=False, progress=printer.progress)
    printer.step(1, Step("capture", 1.0, True, "Linear", parts=cm.steps))
    at_register = len(shown)
    mv = registry.register("lin", cm, progress=printer.progress)
    printer.step(2, Step("register", 1.0, True, mv.ref, parts={"save": 0.5, "publish": 2.0}))
    during_capture, during_register = shown[:at_register - 1], shown[at_register:-1]
    assert during_capture and all(s.startswith("      capture ") for s in during_capture), shown
    assert during_register and all(s.startswith("      register ") for s in during_register), shown
    assert [p for p in CAPTURE if any(p in s for s in during_capture)] == CAPTURE
    assert [p for p in REGISTER if any(p in s for s in during_register)] == REGISTER
    assert shown[at_register - 1].startswith("[1/5] capture ") and "torch.export " in shown[at_register - 1]
    assert shown[-1].startswith("[2/5] register ") and shown[-1].endswith(" (save 0.5s, publish 2.0s)")


# ---------------------------------------------------------------- byte meters (a bucket upload inside a step)


class _Terminal:
    """stderr as a terminal shows it: what was written, and isatty() true."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_a_meter_says_bytes_to_a_sink_throttled_and_the_last_always():
    lines: list[str] = []
    meter = Steps(lines.append, "register x").meter("upload", "x/versions/1/model.pt2")
    assert meter is not None
    for done in (0, 1_000_000, 2_000_000, 4_000_000):
        meter(done, 4_000_000)
    assert lines == ["  … upload: x/versions/1/model.pt2 0.0 of 4.0 MB (0%)",  # the middle two: within 0.5 s
                     "  … upload: x/versions/1/model.pt2 4.0 of 4.0 MB (100%)"]
    assert Steps(False, "register x").meter("upload", "k") is None


@pytest.mark.parametrize("tqdm", [True, False])
def test_a_meter_on_a_terminal_is_one_updating_line_and_silent_elsewhere(monkeypatch, tqdm):
    import sys

    if not tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: the plain line
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    meter = Steps(None, "register x").meter("upload", "model.pt2")
    assert meter is not None
    meter(0, 3 << 20)
    meter(3 << 20, 3 << 20)
    meter(3 << 20, 3 << 20)  # after the end: nothing more
    out = term.text
    assert "model.pt2" in out and out.endswith("\n") and out.count("\n") == 1, repr(out)
    assert ("100%" in out) and (("3.15M" in out or "3.00M" in out) if tqdm else "3.1 of 3.1 MB (100%)" in out)

    class _Pipe(_Terminal):
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stderr", _Pipe())
    assert Steps(None, "register x").meter("upload", "model.pt2") is None  # a log file gets the step's end line


# ---------------------------------------------------------------- Registry(path) signs with the user's key


def test_registry_path_signs_with_the_configured_key(tmp_path: Path, keyring, capsys):
    """The session's KIT_KEYS_DIR (tests/conftest.py) is the configured key folder, as from_config reads it."""
    reg = Registry(tmp_path / "reg")
    assert reg.keyring is not None and reg.keyring.can_sign()
    mv = reg.register("lin", *_tiny(), onnx=False, progress=False)
    [result] = reg.verify("lin")
    assert result.ok and result.signed_by == keyring.signer().key_id
    assert (mv.path / "meta.json.sig").is_file()


def test_keyring_none_is_an_unsigned_registry_and_a_bad_value_is_refused(tmp_path: Path):
    reg = Registry(tmp_path / "reg", keyring=None)
    assert reg.keyring is None
    mv = reg.register("lin", *_tiny(), onnx=False, progress=False)
    assert not (mv.path / "meta.json.sig").exists()
    assert reg.verify("lin")[0].signed_by is None
    with pytest.raises(ConfigError, match="keyring must be"):
        Registry(tmp_path / "reg", keyring="mine")


def test_a_reader_makes_no_key(tmp_path: Path, monkeypatch):
    keys = tmp_path / "keys"
    monkeypatch.setenv("KIT_KEYS_DIR", str(keys))
    writer = Registry(tmp_path / "reg", keyring=None)
    writer.register("lin", *_tiny(), onnx=False, progress=False)
    reader = Registry(tmp_path / "reg")  # lists and reads: never signs
    assert reader.models() == ["lin"] and [v.version for v in reader.versions("lin")] == [1]
    assert reader.aliases("lin").production is None
    assert not keys.exists() or not any(keys.iterdir())


@pytest.mark.parametrize("move", [{"promote": True}, {"canary": 0.1}])
def test_deploy_refuses_to_move_an_alias_in_an_unsigned_registry_before_any_work(tmp_path: Path, move: Any):
    from kit.deploy import deploy

    reg = Registry(tmp_path / "reg", keyring=None)
    with pytest.raises(SigningKeyError) as err:
        deploy(reg, *_tiny(), "lin", **move)
    msg = str(err.value)
    assert "unsigned" in msg and f"Registry({str(tmp_path / 'reg')!r})" in msg and "\n" not in msg
    assert reg.models() == []  # nothing captured or registered
