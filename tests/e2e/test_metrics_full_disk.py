"""A full metrics filesystem costs metrics, never answers (real gunicorn, a real full tmpfs).

prometheus-client grew its per-worker sample files sparse and wrote through the mapping, so on a full
filesystem every new worker died of SIGBUS at its first sample: a crash loop without one answer. Now the
files' blocks are allocated before they are mapped; a worker that cannot get them serves anyway and says
"metrics degraded" on /readyz.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from kit_testing import child_pids, get_json
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "metrics"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"needs a small tmpfs to fill and `mount` was refused here: {out.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _predict(url: str) -> int:
    req = urllib.request.Request(url + "/predict", data=json.dumps({"inputs": [[0.5] * 4]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status



def test_a_worker_started_on_a_full_metrics_filesystem_answers_and_says_metrics_degraded(tmp_path, small_tmpfs):
    reg = Registry(tmp_path / "registry", require_gate=True)
    torch.manual_seed(0)
    reg.register("tiny", nn.Linear(4, 2).eval(), torch.rand(2, 4))
    reg.promote("tiny", 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("tiny", "tiny", registry=reg.root, out_dir=tmp_path / "services", workers=1)
    svc = start_service(d, env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(small_tmpfs)), timeout=90)
    try:
        assert _predict(svc.url) == 200
        _fill(small_tmpfs)  # the filesystem is now full: a new worker cannot get space for its samples
        [old] = child_pids(svc.pid)
        os.kill(old, signal.SIGKILL)
        deadline, answered, body = time.monotonic() + 30, 0, {}
        while time.monotonic() < deadline and answered < 20:
            try:
                _, body = get_json(svc.url + "/readyz")
                if body.get("pid") not in (None, old) and body.get("ready"):
                    answered += _predict(svc.url) == 200
            except OSError:
                pass
            time.sleep(0.05)
        assert answered == 20, f"the new worker did not serve on a full metrics filesystem: {svc.logs()[-3000:]}"
        assert body["metrics"]["status"] == "degraded" and "No space left" in body["metrics"]["reason"], body
        assert svc.alive() and "Bus error" not in svc.logs() and "SIGBUS" not in svc.logs()
        assert len(child_pids(svc.pid)) == 1  # no crash loop: the one replacement worker is still there
    finally:
        svc.stop()
