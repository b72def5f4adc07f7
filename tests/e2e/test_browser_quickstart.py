"""A real browser: JupyterLab on 127.0.0.1, headless Debian chromium driven by playwright, runs the quickstart.

It opens notebooks/quickstart.ipynb (a copy, in a throw-away project), runs every cell, and checks that
the registry panel is rendered by JupyterLab's widget manager, with its table, badges and buttons.
Screenshots are kept in test-artifacts/. Playwright never downloads a browser here: it drives
/usr/bin/chromium (`make browser-deps`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kit_testing import make_project, processes_under

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_MS = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




@pytest.fixture
def project(tmp_path: Path, repo_root: Path):
    root = make_project(tmp_path / "project", repo_root)
    yield root
    for pid in processes_under(root):  # a kernel or service left behind by a failed run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def lab(project: Path, tmp_path: Path, kit_env):
    """JupyterLab on 127.0.0.1 with a token, its notebook root the throw-away project's notebooks/."""
    port, token = free_port(), secrets.token_hex(16)
    env = dict(kit_env)
    env.pop("KIT_PROJECT_ROOT", None)
    env.update(
        KIT_REGISTRY=str(project / "registry"),
        JUPYTER_PATH=str(project / "jupyter"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
    )
    # No "get notified about Jupyter news?" toast over the screenshot (and no request for the news).
    news = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={project / 'notebooks'}",
             "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=project, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab was not up after 90s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield base, token, log_path
    finally:
        # Shut the kernels down through the API (they stop the service's cell if it never ran), then Lab.
        try:
            with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as r:
                kernels = json.load(r)
            for k in kernels:
                req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


NOTEBOOK_STATE = """() => {
  const app = window.jupyterapp;
  const nb = app && app.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext) return null;
  const cells = nb.content.widgets.map(c => c.model).filter(m => m.type === 'code');
  return {
    kernel: nb.sessionContext.kernelDisplayStatus,
    kernelName: nb.sessionContext.kernelDisplayName,
    executed: cells.filter(m => m.executionCount !== null).length,
    total: cells.length,
    errors: cells.flatMap(m => m.outputs.toJSON()).filter(o => o.output_type === 'error')
                 .map(o => o.ename + ': ' + o.evalue),
  };
}"""


def test_quickstart_in_jupyterlab_renders_the_registry_panel(lab, project: Path, tmp_path: Path,
                                                               artifacts_dir: Path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium not installed (make browser-deps)")
    from playwright import sync_api
    base, token, lab_log = lab
    shot = artifacts_dir / "browser-quickstart.png"
    panel_shot = artifacts_dir / "browser-registry-panel.png"
    for p in (shot, panel_shot):
        p.unlink(missing_ok=True)

    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = ctx.new_page()
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            page.goto(f"{base}/lab/tree/quickstart.ipynb?token={token}", wait_until="domcontentloaded")
            page.wait_for_function(
                f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}", timeout=120_000)
            state = page.evaluate(NOTEBOOK_STATE)
            assert state["kernelName"] == "Kit (test)", state  # the notebook's kernelspec, this environment

            t0 = time.monotonic()
            run_all = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"
            started = (f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && (s.kernel !== 'idle' || "
                       "s.executed > 0); }")
            page.evaluate(run_all)
            try:
                page.wait_for_function(started, timeout=30_000, polling=250)
            except sync_api.TimeoutError:
                # Lab can report the kernel idle a moment before its session accepts requests, and then
                # drops the run; nothing has executed, so asking again runs nothing twice.
                assert page.evaluate(NOTEBOOK_STATE)["executed"] == 0
                page.evaluate(run_all)
                page.wait_for_function(started, timeout=30_000, polling=250)
            panel = page.locator(".kit-registry-panel")
            try:
                # Done when every code cell has run, or as soon as one fails (Run All stops there).
                page.wait_for_function(
                    f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && (s.errors.length > 0 || "
                    "(s.kernel === 'idle' && s.executed === s.total)); }", timeout=RUN_TIMEOUT_MS,
                    polling=500)
            finally:
                page.screenshot(path=str(shot))
            seconds = time.monotonic() - t0
            state = page.evaluate(NOTEBOOK_STATE)
            assert not state["errors"], f"cells failed in the browser: {state['errors']}"
            assert state["executed"] == state["total"], state
            print(f"quickstart in JupyterLab: {seconds:.1f}s")
            panel.wait_for(state="visible", timeout=30_000)

            # The panel is rendered by the widget manager: table rows, badges, buttons, the slider.
            panel.scroll_into_view_if_needed()
            table = panel.locator("table.kit-table")
            assert table.locator("tbody tr").count() == 2
            text = panel.inner_text()
            for needle in ("demo-digits", "production", "canary 50%", "passed", "Validate", "Promote",
                           "Rollback"):
                assert needle in text, f"{needle!r} not in the rendered panel:\n{text}"
            assert panel.locator(".widget-slider").count() == 1
            assert panel.locator(".kit-b-production").count() == 1 and panel.locator(".kit-b-canary").count() == 1
            panel.screenshot(path=str(panel_shot))
            page.screenshot(path=str(shot))
            assert not console_errors, console_errors
        finally:
            ctx.close()
    assert shot.stat().st_size > 10_000 and panel_shot.stat().st_size > 5_000
    assert not processes_under(project / "services"), "the notebook's service is still running"
