"""What Kit's outputs must satisfy in the system's own tools (moved from tests/unit: each runs one):
openssl verifies Kit's signatures as run.sh does, the packed run.sh parses under bash -n, the systemd unit
passes systemd-analyze verify."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kit.errors import PackError
from kit.pack.build import _render, check_unit
from kit.signing import KeyStore, sig_path, sign_file


def test_openssl_verifies_a_kit_signature_with_the_pem_public_key(tmp_path):
    """run.sh verifies with the system openssl: Kit's PEM and raw signatures must be what openssl expects."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    key = KeyStore(tmp_path / "keys").new()
    data = tmp_path / "file.txt"
    data.write_bytes(b"hello\n")
    sign_file(data, key)
    rec = json.loads(sig_path(data).read_text())
    import base64

    (tmp_path / "sig.bin").write_bytes(base64.b64decode(rec["signature"]))
    (tmp_path / "pub.pem").write_text(key.public.pem())
    cmd = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-rawin",
           "-in", str(data), "-sigfile", str(tmp_path / "sig.bin")]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    data.write_bytes(b"hellO\n")
    assert subprocess.run(cmd, capture_output=True).returncode != 0


def test_run_sh_renders_and_is_valid_bash(tmp_path):
    ctx = dict(service="demo", label="v3", kit_version="0.1.0", kind="venv", created="now", python="3.11.7",
               platform="linux-x86_64", base_interpreter="/opt/py/bin/python3.11", unit="kit-demo.service",
               bind="0.0.0.0:8000", app="app:app")
    script = tmp_path / "run.sh"
    script.write_text(_render("run.sh.j2", **ctx))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert 'exec "$PY" -m gunicorn --config gunicorn.conf.py app:app' in text
    assert 'BASE_PYTHON="/opt/py/bin/python3.11"' in text and "conda-unpack" in text


def test_systemd_unit_passes_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the unit is then only rendered, not verified)")
    unit = _render("unit.service.j2", service="demo", label="v3", unit="kit-demo.service", bind="0.0.0.0:8000")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    assert check_unit(unit, tmp_path) is not None
    with pytest.raises(PackError, match="systemd-analyze verify rejected"):
        check_unit(unit, tmp_path / "missing")  # ExecStart not executable there
