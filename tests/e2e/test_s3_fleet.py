"""The issue's bar for a registry in a bucket: three service instances (own caches: three "hosts") behind
Debian's nginx, all following ``s3://`` on a real S3 server (SeaweedFS) by conditional GETs every 0.5 s,
follow a canary and a rollback within 2 s, and answer every request while the store is stopped for 10 s
and started again (each instance saying so on /readyz meanwhile)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from s3_server import digits_registry

from kit._proc import free_port, http_status, stop_group, wait_http
from kit.fleet import service_settings
from kit.fleet.nginx import NginxOptions, render_nginx
from kit.servicegen import generate, start_service

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed (make fleet-deps)")]

MODEL = "s3-fleet"
FOLLOW_S = 2.0


def _traffic(url: str, stop: threading.Event, records: list[tuple[float, int, int | None]]) -> None:
    """Keep-alive requests through nginx until ``stop``: (time, status, served version); nothing retried."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"inputs": [[0.5] * 64]})
    while not stop.is_set():
        t = time.time()
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            v = r.getheader("X-Kit-Model-Version")
            records.append((t, r.status, int(v) if v else None))
        except (OSError, http.client.HTTPException):
            records.append((t, 0, None))
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        time.sleep(0.01)
    conn.close()


def _readyz(port: int) -> dict:
    status, body = http_status(f"http://127.0.0.1:{port}/readyz")
    return json.loads(body) if status else {}


def _follow(ports: list[int], t_move: float, pred, what: str) -> list[float]:
    """Seconds after ``t_move`` at which each instance's /readyz first satisfied ``pred``."""
    seen: dict[int, float] = {}
    deadline = time.time() + 60
    while len(seen) < len(ports) and time.time() < deadline:
        for p in ports:
            if p not in seen and pred(_readyz(p)):
                seen[p] = time.time() - t_move
        time.sleep(0.02)
    assert len(seen) == len(ports), f"not every instance {what} within 60 s: {seen}"
    return [round(seen[p], 3) for p in ports]


def test_three_instances_follow_the_bucket_through_a_store_outage(s3_server, s3_env, tmp_path: Path):
    url_reg = f"s3://kit-test/fleet-{uuid.uuid4().hex[:8]}"
    reg = digits_registry(url_reg, MODEL, tmp_path / "keys", tmp_path / "operator-cache", 3)
    keys = reg.keyring
    reg.promote(MODEL, 1, force=True, why="test")
    reg.promote(MODEL, 2, force=True, why="test")  # production 2, previous [1]: what the rollback returns to
    d = generate("s3fleet", MODEL, registry=tmp_path / "unused", out_dir=tmp_path / "services", workers=1,
                 poll_interval=0.5, trusted_keys=keys.service_keys(), check_model=False)
    ports = [free_port() for _ in range(3)]
    instances, nginx = [], None
    records: list[tuple[float, int, int | None]] = []
    stop = threading.Event()
    loader = None
    try:
        for i, port in enumerate(ports):  # each its own cache: three hosts downloading once each
            env = {**os.environ, "KIT_REGISTRY": url_reg, "KIT_CACHE_DIR": str(tmp_path / f"host{i}")}
            instances.append(start_service(d, port=port, env=env, timeout=120, log_path=tmp_path / f"i{i}.log"))
        state = tmp_path / "nginx"
        state.mkdir()
        listen = f"127.0.0.1:{free_port()}"
        conf = tmp_path / "nginx.conf"
        conf.write_text(render_nginx(service_settings(d), [f"127.0.0.1:{p}" for p in ports], listen,
                                     options=NginxOptions(state_dir=str(state), run_as="root")))
        nginx = subprocess.Popen([str(NGINX), "-c", str(conf), "-e", str(state / "stderr.log"), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://{listen}/readyz", timeout=20, process=nginx, log_path=state / "error.log")
        loader = threading.Thread(target=_traffic, args=(f"http://{listen}", stop, records), daemon=True)
        loader.start()
        time.sleep(1.0)

        t_move = time.time()
        reg.set_canary(MODEL, 3, 0.3, force=True, why="fleet test")
        canary = _follow(ports, t_move, lambda b: (b.get("canary") or {}).get("version") == 3, "started the canary")
        print(f"\ncanary followed by the 3 instances after {canary} s")

        s3_server.stop()
        t_down = time.time()
        _follow(ports, t_down, lambda b: b.get("reload_error") is not None
                and "could not read" in b["reload_error"]["error"], "reported the unreachable store")
        time.sleep(max(0.0, 10 - (time.time() - t_down)))
        s3_server.start()
        back = _follow(ports, time.time(), lambda b: b.get("reload_error") is None, "recovered")
        print(f"store down {time.time() - t_down:.1f} s; recovered after {back} s")

        t_move = time.time()
        reg.rollback(MODEL, why="fleet test")
        rollback = _follow(ports, t_move, lambda b: (b.get("production") or {}).get("version") == 1
                           and b.get("canary") is None, "rolled back")
        print(f"rollback followed by the 3 instances after {rollback} s")
        time.sleep(1.0)
    finally:
        stop.set()
        if loader is not None:
            loader.join(30)
        if nginx is not None:
            stop_group(nginx, sig=signal.SIGQUIT)
        for svc in instances:
            svc.stop(timeout=10)
    failed = [r for r in records if r[1] != 200]
    print(f"{len(records)} requests through nginx, {len(failed)} failed")
    assert max(canary) <= FOLLOW_S and max(rollback) <= FOLLOW_S, (canary, rollback)
    assert len(records) > 200 and failed == [], failed[:5]
    assert {r[2] for r in records if r[0] > t_move + max(rollback) + 0.1} == {1}
