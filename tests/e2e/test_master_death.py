"""A SIGKILLed gunicorn master takes its workers with it (real gunicorn): the orphans used to keep serving
and hold the port, so the service could not start again. And a port that something holds is refused at
start with the holder named, not after gunicorn's five silent retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kit_testing import child_pids, wait_all_workers
from torch import nn

from kit.errors import ServiceError
from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]



def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def service_dir(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=True)
    torch.manual_seed(0)
    reg.register("tiny", nn.Linear(4, 2).eval(), torch.rand(2, 4))
    reg.promote("tiny", 1, force=True, why="test")  # gates are tested by the gate area
    return generate("tiny", "tiny", registry=reg.root, out_dir=tmp_path / "services", workers=2)


def test_workers_exit_soon_after_their_masters_death_and_the_port_frees(service_dir):
    svc = start_service(service_dir, timeout=90)
    port = int(svc.url.rsplit(":", 1)[1])
    try:
        deadline = time.monotonic() + 30
        while len(workers := child_pids(svc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2, workers
        wait_all_workers(svc.url, lambda body: body.get("ready") is True)
        os.kill(svc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        # the watch polls every 0.2 s and gives in-flight requests 1 s; a loaded CI box adds its own delay,
        # so the bound is generous: what must not happen is an orphan that serves on and holds the port
        while any(_alive(w) for w in workers) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        assert not any(_alive(w) for w in workers), f"workers {workers} outlived their master by {gone:.1f} s"
    finally:
        svc.stop()
    again = start_service(service_dir, port=port, timeout=90)  # the port is free: the service starts again
    again.stop()


def test_a_taken_port_is_refused_at_start_naming_its_holder(service_dir):
    svc = start_service(service_dir, timeout=90)
    port = int(svc.url.rsplit(":", 1)[1])
    try:
        env = dict(os.environ, KIT_BIND=f"127.0.0.1:{port}")
        t0 = time.monotonic()
        with subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:app"],
                              cwd=service_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=60)
            finally:
                proc.kill()
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert out.returncode != 0
        assert f"127.0.0.1:{port} is already in use by pid" in out.stderr, out.stderr[-2000:]
        assert str(svc.pid) in out.stderr or any(str(w) in out.stderr for w in child_pids(svc.pid))
        assert time.monotonic() - t0 < 30  # not gunicorn's retries
        with pytest.raises(ServiceError, match="already in use"):
            start_service(service_dir, port=port, timeout=30)
    finally:
        svc.stop()
