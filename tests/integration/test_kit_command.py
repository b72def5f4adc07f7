"""The installed `kit` console script, as a user runs it (real subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def kit_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "kit"
    return [str(exe)] if exe.exists() else [shutil.which("kit") or "kit"]


def test_console_script_lists_and_errors(kit_env, tmp_path):
    res = subprocess.run([*kit_cmd(), "--help"], env=kit_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("models", "show", "verify", "history", "promote", "canary", "rollback", "env"):
        assert cmd in res.stdout
    res = subprocess.run([*kit_cmd(), "models"], env=kit_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "No models in" in res.stdout
    res = subprocess.run([*kit_cmd(), "show", "ghost@1"], env=kit_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"kit: error: No model 'ghost' in the registry at {tmp_path / 'registry'} " \
        "(models: none). Register one with kit.registry.Registry.register() or %deploy."
