"""Graceful shutdown with real gunicorn: SIGTERM lets a request that is in flight finish (200)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Slow(nn.Module):
    """Deliberately slow: 48 chained 768x768 layers (~0.1-0.5 s for 256 rows on one thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(768, 768) for _ in range(48)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_sigterm_finishes_in_flight_requests(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=True)
    torch.manual_seed(0)
    reg.register("slow", Slow().eval(), torch.rand(2, 768))
    reg.promote("slow", 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("slow", "slow", registry=reg.root, out_dir=tmp_path / "services", workers=1,
                 max_batch=256, batching=False)
    svc = start_service(d, timeout=90)
    try:
        body = json.dumps({"inputs": [[0.1] * 768] * 256}).encode()
        result: dict = {}

        def call() -> None:
            req = urllib.request.Request(svc.url + "/predict", data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                result["status"], result["body"] = r.status, json.loads(r.read())
            result["seconds"] = time.perf_counter() - t0

        for _ in range(2):  # warm, and measure how long one request takes here
            call()
        one = result["seconds"]
        assert one > 0.1, f"the slow model took only {one:.3f}s; the test needs a request still in flight"
        result.clear()
        t = threading.Thread(target=call)
        t.start()
        time.sleep(min(0.05, one / 4))  # the request is now being computed
        svc.process.send_signal(15)
        t.join(60)
        assert result.get("status") == 200 and len(result["body"]["outputs"]) == 256, result.keys()
        assert svc.process.wait(30) == 0  # the master exits cleanly once the worker has finished
        assert "Worker exiting" in svc.logs()
    finally:
        svc.stop()
