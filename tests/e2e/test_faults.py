"""Faults an operator meets, each against a real gunicorn service under a steady load of real HTTP requests
(a client thread, one request at a time, failures counted):

- a worker SIGKILLed (the OOM killer under a memory limit): a handful of requests fail, the master starts
  another, the service never stops answering;
- a fresh worker whose production cannot be cached (the cache's disk full): before, it never became
  ready (503 for every request it took); now it falls back to the previous production and /readyz says so;
- the registry unreachable for a while (folder renamed away: an unmounted share): keeps serving, /readyz
  says the registry is unreachable, and recovers when it is back;
- the registry remounted read-only: keeps serving; a move is refused with one StorageError line.

Faults with their own e2e files (not repeated here): registry files truncated under a served version
(test_storage_races.py), a SIGKILLed master (test_master_death.py), a full metrics disk
(test_metrics_full_disk.py); register and moves on a full disk: tests/integration/test_full_disk.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fs_faults import fill, remount, small_tmpfs
from kit_testing import child_pids, get_json
from torch import nn

from kit.errors import StorageError
from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
HANDFUL = 5  # requests a fault may cost: those in flight on a killed worker, and a retry's worth


@dataclass
class Load:
    """POST /predict in a loop from a thread; every answer's time and outcome is kept."""

    url: str
    results: list[tuple[float, bool, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = json.dumps({"inputs": [[0.5] * 4]}).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(self.url + "/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    ok, what = r.status == 200, str(r.status)
            except urllib.error.HTTPError as exc:
                ok, what = False, str(exc.code)
            except OSError as exc:
                ok, what = False, type(exc).__name__
            self.results.append((time.monotonic(), ok, what))
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(15)

    def since(self, t0: float) -> tuple[int, int, float]:
        """(answered, failed, longest gap between good answers) from ``t0`` on."""
        rows = [r for r in self.results if r[0] >= t0]
        good = [t0] + [t for t, ok, _ in rows if ok]
        gap = max((b - a for a, b in zip(good, good[1:])), default=float("inf"))
        return len(rows), sum(1 for r in rows if not r[1]), gap

    def wait_good(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for r in self.results[-n:] if r[1]) == n:
                return
            time.sleep(0.05)
        raise AssertionError(f"no {n} good answers in a row; last: {self.results[-5:]}")


def _registry(root: Path, versions: int = 2) -> Registry:
    reg = Registry(root)
    for s in range(versions):
        torch.manual_seed(s)
        reg.register("tiny", nn.Linear(4, 2).eval(), torch.rand(2, 4))
    reg.promote("tiny", 1, force=True, why="test")  # gates are tested by the gate area
    return reg


def _service(tmp_path: Path, reg: Registry, workers: int, env: dict[str, str] | None = None):
    d = generate("tiny", "tiny", registry=reg.root, out_dir=tmp_path / "services", workers=workers)
    return start_service(d, env=dict(os.environ, **(env or {})), timeout=120)


def _readyz_until(url: str, pred, timeout: float = 60.0) -> dict:
    deadline, body = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            _, body = get_json(url + "/readyz")
            if pred(body):
                return body
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/readyz never matched; last: {body}")


def test_an_oom_killed_worker_costs_a_handful_and_the_master_replaces_it(tmp_path):
    svc = _service(tmp_path, _registry(tmp_path / "registry", 1), workers=2)
    load = Load(svc.url)
    try:
        deadline = time.monotonic() + 60
        while len(workers := child_pids(svc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        load.wait_good(20)
        t0 = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does under a memory limit
        body = _readyz_until(svc.url, lambda b: b.get("ready") and b.get("pid") not in workers)
        time.sleep(1.0)
        answered, failed, gap = load.since(t0)
        print(f"OOM kill: {answered} answered, {failed} failed, longest gap {gap:.2f} s; new worker {body['pid']}")
        assert failed <= HANDFUL and gap < 2.0, (failed, gap, load.results[-20:])
        assert len(child_pids(svc.pid)) == 2 and body["production"]["version"] == 1
    finally:
        load.finish()
        svc.stop()


def test_a_fresh_worker_falls_back_to_the_previous_production_when_production_cannot_be_cached(tmp_path):
    """Before: the restarted worker could not copy production into its full cache and never became ready,
    so every request after the kill failed (one worker) until an operator freed space."""
    reg = _registry(tmp_path / "registry")
    with small_tmpfs(tmp_path / "cache", "4m") as cache:
        svc = _service(tmp_path, reg, workers=1, env={"KIT_CACHE_DIR": str(cache)})
        load = Load(svc.url)
        try:
            load.wait_good(20)
            filler = fill(cache)  # the cache's disk is full: v2 cannot be copied in, v1 stays cached
            reg.promote("tiny", 2, force=True, why="a version the full cache cannot take")
            body = _readyz_until(svc.url, lambda b: b.get("reload_error") is not None)
            assert body["production"]["version"] == 1 and body["status"].startswith("degraded")
            [worker] = child_pids(svc.pid)
            t0 = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            body = _readyz_until(svc.url, lambda b: b.get("pid") not in (None, worker) and b.get("ready"))
            load.wait_good(20)
            answered, failed, gap = load.since(t0)
            print(f"fallback: {answered} answered, {failed} failed, no answer for {gap:.2f} s (worker restart)")
            fb = body["reload_error"]["fallback"]
            assert body["production"]["version"] == 1 and fb["serving"] == 1 and fb["wanted"]["production"] == 2
            assert "No space left" in fb["why"] or "full" in fb["why"], fb
            assert failed <= HANDFUL, load.results[-20:]
            filler.unlink()  # space again: the retry serves what aliases.json says
            body = _readyz_until(svc.url, lambda b: (b.get("production") or {}).get("version") == 2, timeout=90)
            assert body["reload_error"] is None and body["status"] == "ok"
        finally:
            load.finish()
            svc.stop()


def test_an_unreachable_registry_keeps_serving_and_says_so(tmp_path):
    reg = _registry(tmp_path / "registry", 1)
    svc = _service(tmp_path, reg, workers=2)
    load = Load(svc.url)
    away = tmp_path / "registry-away"
    try:
        load.wait_good(20)
        t0 = time.monotonic()
        reg.root.rename(away)  # an unmounted share
        body = _readyz_until(svc.url, lambda b: "unreachable" in str((b.get("reload_error") or {}).get("error")))
        assert body["production"]["version"] == 1 and "still serving version 1" in body["reload_error"]["error"]
        time.sleep(2.0)
        away.rename(reg.root)
        _readyz_until(svc.url, lambda b: b.get("reload_error") is None and b.get("status") == "ok")
        answered, failed, gap = load.since(t0)
        print(f"registry away: {answered} answered, {failed} failed, longest gap {gap:.2f} s")
        assert failed == 0 and answered > 20
    finally:
        load.finish()
        svc.stop()


def test_a_read_only_registry_keeps_serving_and_moves_are_one_line(tmp_path):
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        reg = _registry(disk / "registry")
        svc = _service(tmp_path, reg, workers=2)
        load = Load(svc.url)
        try:
            load.wait_good(20)
            t0 = time.monotonic()
            remount(disk, "ro")
            try:
                with pytest.raises(StorageError, match=r"Cannot write a move of 'tiny': .* read-only") as ei:
                    reg.promote("tiny", 2, force=True, why="ro")  # the CLI's line: tests/integration/test_full_disk.py
                assert "\n" not in str(ei.value)
                time.sleep(2.0)
            finally:
                remount(disk, "rw")
            answered, failed, _ = load.since(t0)
            assert failed == 0 and answered > 20
            _, body = get_json(svc.url + "/readyz")
            assert body["production"]["version"] == 1 and body["ready"]
        finally:
            load.finish()
            svc.stop()
