"""A service (real gunicorn, 2 workers, 127.0.0.1) whose registry is a bucket on a real S3 server
(SeaweedFS): it follows a promote and a rollback by polling aliases.json with conditional GETs, and keeps
answering every request while the store is stopped for 10 s, saying so on /readyz, then recovers."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import uuid

import pytest
from kit_testing import get_json, wait_all_workers
from s3_server import digits_registry

from kit.servicegen import generate, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

MODEL = "s3-served"


def _predict(url: str) -> int:
    req = urllib.request.Request(url + "/predict", data=json.dumps({"inputs": [[0.25] * 64]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(json.loads(r.read())["model_version"])


def _serving(v: int):
    return lambda b: b["production"] is not None and b["production"]["version"] == v and b["reload_error"] is None


def test_service_follows_the_bucket_and_survives_a_store_outage(s3_server, s3_env, tmp_path):
    url_reg = f"s3://kit-test/svc-{uuid.uuid4().hex[:8]}"
    reg = digits_registry(url_reg, MODEL, tmp_path / "keys", tmp_path / "writer-cache", 2)
    keys = reg.keyring
    reg.promote(MODEL, 1, force=True, why="test")  # gates are the gate area's tests
    d = generate("s3svc", MODEL, registry=tmp_path / "unused", out_dir=tmp_path / "services", workers=2,
                 poll_interval=0.5, trusted_keys=keys.service_keys(), check_model=False)
    env = {**os.environ, "KIT_REGISTRY": url_reg, "KIT_CACHE_DIR": str(tmp_path / "service-cache")}
    with start_service(d, timeout=120, env=env) as running:
        url = running.url
        assert _predict(url) == 1
        t0 = time.perf_counter()
        reg.promote(MODEL, 2, force=True, why="test")
        wait_all_workers(url, _serving(2), timeout=30)
        print(f"\nS3 alias propagation (promote -> every worker serves v2): {time.perf_counter() - t0:.2f} s")

        failures: list[str] = []
        served: set[int] = set()
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    served.add(_predict(url))
                except Exception as exc:  # any failed request fails the test
                    failures.append(repr(exc))
                time.sleep(0.02)

        th = threading.Thread(target=load)
        th.start()
        try:
            s3_server.stop()
            t_down = time.monotonic()
            body = wait_all_workers(url, lambda b: b["reload_error"] is not None, timeout=30)
            assert body["status"].startswith("degraded") and "could not read" in body["reload_error"]["error"]
            assert body["production"]["version"] == 2
            time.sleep(max(0.0, 10 - (time.monotonic() - t_down)))
            s3_server.start()
            wait_all_workers(url, _serving(2), timeout=60)
        finally:
            stop.set()
            th.join(30)
        assert failures == [] and served == {2}

        t0 = time.perf_counter()
        reg.rollback(MODEL, why="back")
        wait_all_workers(url, _serving(1), timeout=30)
        print(f"S3 rollback propagation: {time.perf_counter() - t0:.2f} s")
        status, body = get_json(url + "/readyz")
        assert status == 200 and body["production"]["version"] == 1
