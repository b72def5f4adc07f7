"""Debian's Prometheus scraping a live Kit service with the files `kit fleet prometheus` writes: promtool
accepts the config and the rules, a real scrape sees Kit's metrics (asked through Prometheus' HTTP API),
and every recording and alert rule evaluates without error against the live series."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import torch

from kit._proc import free_port, stop_group, wait_http
from kit.demo import DigitsMLP
from kit.fleet import service_settings, write_files
from kit.fleet.prometheus import PrometheusOptions, render_prometheus
from kit.registry import Registry
from kit.servicegen import generate, start_service

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(240),
    pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                       reason="Debian's prometheus (prometheus, promtool) is not installed (make fleet-deps)"),
]
MODEL = "prom-digits"


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _until(fn, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"nothing after {timeout}s")


def test_prometheus_scrapes_kit_and_the_rules_evaluate(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=True, user="prom-test")
    example = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        torch.manual_seed(seed)
        reg.register(MODEL, DigitsMLP().eval(), example)
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested in their own area
    reg.set_canary(MODEL, 2, 0.5, force=True, why="test")
    d = generate("prom", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=1)
    conf = tmp_path / "prometheus"
    with start_service(d, timeout=90) as svc:
        target = svc.url.removeprefix("http://")
        write_files(render_prometheus(service_settings(d), [target], PrometheusOptions(scrape_interval="1s")), conf)
        for args in (["check", "config", str(conf / "prometheus.yml")], ["check", "rules", str(conf / "kit-prom.rules.yml")]):
            res = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout + res.stderr
        def predict(n: int) -> None:
            for i in range(n):
                req = urllib.request.Request(svc.url + "/predict", data=json.dumps({"inputs": [[0.5] * 64]}).encode(),
                                             headers={"Content-Type": "application/json", "X-Kit-User": f"u{i}"})
                urllib.request.urlopen(req, timeout=10).read()

        predict(40)
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as logf:
            prom = subprocess.Popen([PROMETHEUS, f"--config.file={conf / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/-/ready", timeout=60, process=prom, log_path=log)
            up = _until(lambda: _query(base, 'up{job="kit-prom"} == 1'))
            assert up[0]["metric"]["instance"] == target and up[0]["metric"]["service"] == "prom"
            time.sleep(1.5)
            predict(40)  # after a first scrape: rate() needs two different samples
            def counted() -> dict[str, float]:
                got = _query(base, 'sum by (version) (kit_requests_total{job="kit-prom", code="200"})')
                by_version = {r["metric"]["version"]: float(r["value"][1]) for r in got}
                return by_version if sum(by_version.values()) >= 80 else {}

            assert set(_until(counted)) == {"1", "2"}  # both versions' requests, all 80, scraped
            slots = _until(lambda: _query(base, 'kit:slot{job="kit-prom"}'))
            assert {(s["metric"]["slot"], s["metric"]["version"]) for s in slots} == {("production", "1"), ("canary", "2")}
            assert _until(lambda: _query(base, 'kit:latency_p99:5m{job="kit-prom"}'))
            assert _until(lambda: _query(base, 'kit:error_ratio:rate5m{job="kit-prom"}'))
            with urllib.request.urlopen(base + "/api/v1/rules", timeout=10) as r:
                groups = json.loads(r.read())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            assert len(rules) == 10
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not bad, bad
            firing = [r["name"] for r in rules if r.get("state") == "firing"]
            assert not firing, f"a healthy service fires {firing}"
        finally:
            stop_group(prom)
