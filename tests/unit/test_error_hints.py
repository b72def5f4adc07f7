"""Library errors describe the next step as an action; each shell names its own flag for it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kit.cli import cli
from kit.errors import KitError, ServiceError
from kit.registry import Registry
from kit.servicegen import generate

LIBRARY = ("registry", "deploy.py", "servicegen.py", "traffic.py", "capture.py", "env.py", "backends",
           "signing.py", "config.py", "gate", "pack", "signature.py", "fleet")
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _raised_text(path: Path) -> list[tuple[int, str]]:
    """The string parts of every ``raise X(...)`` message in a module, without `backticked commands`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in node.exc.args:
                text = "".join(n.value for n in ast.walk(arg)
                               if isinstance(n, ast.Constant) and isinstance(n.value, str))
                out.append((node.lineno, re.sub(r"`[^`]*`", "", text)))
    return out


def test_library_error_messages_name_no_shell_flags(repo_root):
    found = []
    for entry in LIBRARY:
        p = repo_root / "kit" / entry
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            found += [f"{f.relative_to(repo_root)}:{line}: {text}" for line, text in _raised_text(f)
                      if FLAG.search(text)]
    assert not found, "library errors naming a shell's flag (say the action; set KitError.remedy):\n" + "\n".join(found)


def test_the_cli_adds_its_own_flag_for_the_remedy(tmp_path, registry: Registry):
    reg = registry
    reg.register("m", nn.Linear(4, 2), torch.randn(2, 4))
    with pytest.raises(ServiceError) as e:
        generate("svc", "nope", registry=reg.root, out_dir=tmp_path / "services")
    assert e.value.remedy == "no_check_model" and "--" not in str(e.value)

    def kit(*args: str):
        return CliRunner().invoke(cli, ["--registry", str(reg.root), *args], catch_exceptions=False)

    out = tmp_path / "services"
    res = kit("service", "new", "svc", "--model", "nope", "--out-dir", str(out))
    assert res.exit_code == 2 and res.output.rstrip().endswith("Add --no-check-model."), res.output
    assert kit("service", "new", "svc", "--model", "m", "--out-dir", str(out)).exit_code == 0
    res = kit("service", "new", "svc", "--model", "m", "--out-dir", str(out))
    assert res.exit_code == 2 and res.output.rstrip().endswith("Add --force to this command."), res.output
    res = kit("promote", "m@1")
    assert res.exit_code == 2 and "Validate it first" in res.output
    assert res.output.rstrip().endswith("Run `kit validate m@1`, or add --force --why '...' to this command.")
    assert isinstance(e.value, KitError)
