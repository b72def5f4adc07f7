"""The generated start.sh: the generating environment's Python, and a clear line when it is gone (a real sh)."""

from __future__ import annotations

import subprocess
import sys

from kit.servicegen import render


def test_start_sh_runs_the_generating_python_and_says_so_when_it_is_gone(tmp_path):
    text = render("svc", "m", registry="../registry")["start.sh"]
    assert f'py="${{PYTHON:-{sys.executable}}}"' in text  # not whatever `python` is first on PATH
    script = tmp_path / "start.sh"
    script.write_text(text)
    out = subprocess.run(["sh", str(script)], env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "nope")},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "set PYTHON=/path/to/python" in out.stderr, out.stderr
