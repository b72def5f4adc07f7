"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def processes_under(root: Path) -> list[int]:
    """Processes whose working directory is inside ``root`` (e.g. a service a notebook started)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(p / "cwd"))
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            found.append(int(p.name))
    return found


def write_validation_notebook(path: Path) -> Path:
    """A small, real validation notebook: the version's recorded accuracy against ``min_accuracy``."""
    import nbformat  # here, not at the top: its jsonschema costs ~1.7 CPU-s in every process that imports this

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('registry = ""\nmodel_name = ""\nversion = 0\nmin_accuracy = 0.5',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from kit import gate\nfrom kit.registry import Registry\n"
            "mv = Registry(registry).get(model_name, version)\n"
            'acc = mv.metrics.get("accuracy", 0.0)\n'
            'gate.check("accuracy", acc >= min_accuracy, value=acc, threshold=min_accuracy)'),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def make_project(root: Path, repo_root: Path) -> Path:
    """A project folder the quickstart can run in: kit.toml, notebooks/quickstart.ipynb, and a 'kit' kernel
    under ``root/jupyter`` (point ``JUPYTER_PATH`` there)."""
    (root / "notebooks").mkdir(parents=True)
    (root / "kit.toml").write_text('registry = "registry"\n')
    shutil.copy(repo_root / "notebooks" / "quickstart.ipynb", root / "notebooks" / "quickstart.ipynb")
    # The notebook names the "kit" kernel (what `make env` installs); point it at this interpreter here.
    spec = root / "jupyter" / "kernels" / "kit"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Kit (test)", "language": "python",
    }))
    return root


def pass_gate(reg: Any, name: str, version: int) -> None:
    """Write a passing gate result the way kit.gate does (the gate itself runs in test_gate_papermill.py)."""
    from kit._io import atomic_write_json

    mv = reg.get(name, version)
    path = reg.gate_root(name, version) / "r1" / "result.json"
    atomic_write_json(path, {"run_id": "r1", "passed": True, "artifact_sha256": mv.artifact_sha256})
    reg.sign_evidence(path)  # as kit.gate does: a keyed registry counts only signed results


def three_versions(reg: Any, name: str = "m", gated: tuple[int, ...] = (1, 2, 3)) -> Any:
    """``name`` with three small Linear versions (the ``gated`` ones with a passing gate), production v1.
    The three captures are made once per process, without ONNX (its exporter costs seconds to start)."""
    for captured in _three_captures():
        reg.register(name, captured)
    for v in gated:
        pass_gate(reg, name, v)
    reg.promote(name, 1, user="t")
    return reg


@functools.lru_cache(maxsize=1)
def _three_captures() -> tuple[Any, ...]:
    import torch
    from torch import nn

    from kit.capture import capture

    out = []
    for s in range(3):
        torch.manual_seed(s)
        model = nn.Linear(4, 2)
        out.append(capture(model, torch.randn(2, 4), onnx=False))  # none of their users serves ONNX
    return tuple(out)


def project_keyring():
    """The keyring kit's shells use in this test session (conftest points KIT_KEYS_DIR at a temp folder):
    a registry opened with it signs what it registers, so `kit` commands, magics and the gate trust it."""
    from kit.signing import Keyring

    return Keyring(Path(os.environ["KIT_KEYS_DIR"]))


def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_all_workers(url: str, pred: Any, timeout: float = 30.0) -> dict:
    """Poll /readyz (any worker answers) until ``pred`` has held for 12 answers in a row; the last body."""
    deadline, streak, body = time.monotonic() + timeout, 0, {}
    while time.monotonic() < deadline:
        _, body = get_json(url + "/readyz")
        streak = streak + 1 if pred(body) else 0
        if streak >= 12:
            return body
        time.sleep(0.05)
    raise AssertionError(f"workers did not converge within {timeout}s; last /readyz: {body}")


def start_load(url: str, body: Path, out: Path, *, concurrency: int, duration: float, users: int) -> Any:
    """benchmarks/loadgen.py in its own process: ``users`` sticky users and as many anonymous requests, new
    connections every 25 requests (so they land on either worker); returns the Popen."""
    loadgen = Path(__file__).resolve().parents[1] / "benchmarks" / "loadgen.py"
    return subprocess.Popen([sys.executable, str(loadgen), url, "--body-file", str(body),
                             "--concurrency", str(concurrency), "--duration", str(duration),
                             "--max-requests", "20000", "--users", str(users), "--anonymous", str(users),
                             "--out", str(out), "--reconnect-every", "25"])


def unexpected_versions(records: list, events: list[tuple[float, set[int]]], lag: float) -> list:
    """Load records (start, latency, status, version, user) whose version was not in the aliases when the
    request was sent: ``events`` are (time, versions served from then on); a version may still answer up to
    ``lag`` s after it left (the watchers' poll) and up to 0.5 s before its move was recorded."""
    def allowed(t: float) -> set[int]:
        ok: set[int] = set()
        for i, (start, versions) in enumerate(events):
            end = events[i + 1][0] if i + 1 < len(events) else float("inf")
            if start <= t + 0.5 and end >= t - lag:
                ok |= versions
        return ok

    return [r for r in records if int(r[3]) not in allowed(r[0])]


def child_pids(parent: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``parent``: a gunicorn master's workers."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                out.append(int(p.name))
    return out


def to_legacy_layout(service_dir: Path) -> Path:
    """Turn a freshly generated service folder into what an older Kit generated: the ASGI app in wsgi.py
    (no app.py), and start.sh, gunicorn.conf.py and README.md naming wsgi:app."""
    (service_dir / "app.py").rename(service_dir / "wsgi.py")
    for name in ("start.sh", "gunicorn.conf.py", "README.md"):
        p = service_dir / name
        p.write_text(p.read_text().replace("app:app", "wsgi:app"))
    return service_dir
