"""The shared-registry flow against a real S3 server (SeaweedFS): a version registered from one process with
one key, gated from a second process (``kit validate``: a real papermill kernel) with its own key on its own
"host", and promoted from a third (``kit promote``) that trusts both keys -- only because the gate passed."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kit.registry import Registry
from kit.signing import Keyring

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

_REGISTER = r"""
import sys, torch
from kit.config import load_config
from kit.registry import Registry
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
reg = Registry.from_config(load_config())
print(reg.register("shared-gate", model, (torch.rand(2, 8),)).ref)
"""


def _host(tmp: Path, name: str, s3_env: dict[str, str], url: str, trusted: list[str]) -> dict[str, str]:
    """One machine's environment: its own key folder and cache, the bucket, the keys it trusts."""
    return {**os.environ, **s3_env, "KIT_REGISTRY": url, "KIT_KEYS_DIR": str(tmp / name / "keys"),
            "KIT_CACHE_DIR": str(tmp / name / "cache"), "KIT_TRUSTED_KEYS": ",".join(trusted), "KIT_USER": name}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=500)


def test_register_gate_promote_from_three_processes(s3_server, tmp_path: Path, s3_env):
    url = f"s3://kit-test/gate-{uuid.uuid4().hex[:8]}"
    dev_pub = Keyring(tmp_path / "dev" / "keys").signer().public.text()
    ci_pub = Keyring(tmp_path / "ci" / "keys").signer().public.text()
    kit = [str(Path(sys.executable).parent / "kit")]
    cwd = tmp_path / "work"
    cwd.mkdir()

    dev = _host(tmp_path, "dev", s3_server.env, url, [ci_pub])
    reg_out = _run([sys.executable, "-c", _REGISTER], dev, cwd)
    assert reg_out.returncode == 0, reg_out.stderr[-3000:]
    assert reg_out.stdout.strip().endswith("shared-gate@1")

    refused = _run([*kit, "promote", "shared-gate@1"], dev, cwd)  # no gate yet
    assert refused.returncode != 0 and "no passing gate" in refused.stderr

    ci = _host(tmp_path, "ci", s3_server.env, url, [dev_pub])
    gate = _run([*kit, "validate", "shared-gate@1"], ci, cwd)
    assert gate.returncode == 0, (gate.stdout + gate.stderr)[-4000:]

    promoted = _run([*kit, "promote", "shared-gate@1"], dev, cwd)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    reg = Registry(url, keyring=Keyring.verify_only(Keyring(tmp_path / "dev" / "keys").trust()),
                   cache_dir=tmp_path / "reader")
    a = reg.aliases("shared-gate")
    assert a.production == 1 and a.signed_by == Keyring(tmp_path / "dev" / "keys").signer().key_id
    [gate_ev] = [e for e in reg.history("shared-gate") if e["event"] == "gate"]
    assert gate_ev["passed"] is True and gate_ev["user"] == "ci"
    assert any(k.endswith("/report.html") for k in reg.storage.list_keys("shared-gate/versions/1/gates/"))
