"""notebooks/quickstart.ipynb, executed end to end by papermill on a real kernel.

The notebook runs in a throw-away project (a kit.toml beside a copy of it), so its registry and its
generated service land in tmp_path: real %deploy, real gate, real gunicorn on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from kit_testing import make_project, processes_under

from kit.registry import Registry

pytestmark = pytest.mark.slow

MODEL, SERVICE = "demo-digits", "demo"


def project_env(root: Path, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env["JUPYTER_PATH"] = str(root / "jupyter")
    env["KIT_REGISTRY"] = str(root / "registry")
    env.pop("KIT_PROJECT_ROOT", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env




def kill_leftovers(root: Path) -> list[int]:
    pids = processes_under(root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@pytest.fixture
def project(tmp_path: Path, repo_root: Path):
    root = make_project(tmp_path / "project", repo_root)
    yield root
    kill_leftovers(root / "services")  # only if the notebook failed before its last cell


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "data" in o:
            parts.append(str(o["data"].get("text/plain", "")))
    return "".join(parts)


def test_quickstart_runs_end_to_end(project: Path, kit_env, artifacts_dir: Path):
    src = project / "notebooks" / "quickstart.ipynb"
    out = project / "quickstart.out.ipynb"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(src), str(out), "--cwd", str(project / "notebooks"),
         "-p", "EPOCHS", "15", "--execution-timeout", "240"],
        env=project_env(project, kit_env), capture_output=True, text=True, timeout=420,
    )
    seconds = time.monotonic() - t0
    if out.exists():
        shutil.copy(out, artifacts_dir / "quickstart.executed.ipynb")
    assert proc.returncode == 0, f"papermill failed after {seconds:.0f}s:\n{proc.stderr[-4000:]}"
    print(f"quickstart under papermill: {seconds:.1f}s")

    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

    # %deploy printed one line per step, each with its time and where the result is.
    deploy_cells = [c for c in code if "%deploy" in c.source]
    assert len(deploy_cells) == 2
    first = outputs_text(deploy_cells[0])
    for step in ("capture", "register", "gate", "alias", "service"):
        assert f" {step} " in first, first
    assert "report.html" in first and "production - -> 1" in first and "services/demo" in first

    # The service answered, and routed traffic to the canary after %deploy --canary.
    served = next(outputs_text(c) for c in code if "requests served per version" in c.source)
    assert "{1:" in served and "2:" in served, served

    # The panel was displayed as a widget.
    panel = next(c for c in code if "%registry" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in panel.outputs)

    # The registry holds what the notebook did: two gated versions, production 1, canary 2 at 50%.
    reg = Registry(project / "registry")
    assert [mv.version for mv in reg.versions(MODEL)] == [1, 2]
    a = reg.aliases(MODEL)
    assert (a.production, a.canary) == (1, 2) and a.canary_weight == pytest.approx(0.5)
    for mv in reg.versions(MODEL):
        assert reg.passing_gate(mv) is not None, mv.ref
        assert mv.source.get("via") == "%deploy" and mv.source.get("kind") == "notebook"
    assert (project / "services" / SERVICE / "service.toml").is_file()
    # %deploy delegated the service's canary guard as `kit service new` does: its key is registered, signed
    assert "canary guard key" in first, first
    guards = list((project / "registry" / MODEL / "guards").glob("*.json"))
    assert len(guards) == 1 and (project / "services" / SERVICE / "guard.key").is_file(), guards

    # The last cell stopped the service: nothing the notebook started is left running.
    leftovers = kill_leftovers(project / "services")
    assert not leftovers, f"the quickstart left processes running: {leftovers}"
