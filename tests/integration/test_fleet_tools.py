"""The generated fleet files checked by the tools that will read them: `nginx -t` (Debian's nginx),
`promtool check config/rules` (Debian's prometheus) and the Kubernetes OpenAPI schemas
(kubernetes-validate, offline). No Kubernetes cluster runs here: the manifests are validated against the
schemas of the API versions named below, not applied."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kit.fleet import service_settings, write_files
from kit.fleet.k8s import K8sOptions, render_k8s
from kit.fleet.nginx import NginxOptions, render_nginx
from kit.fleet.prometheus import render_prometheus
from kit.servicegen import generate

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
PROMTOOL = shutil.which("promtool")
K8S_VERSIONS = ("1.29.0", "1.33.0")  # an older and a recent Kubernetes release


@pytest.fixture
def cfg(tmp_path: Path):
    d = generate("tools", "digits", registry=tmp_path / "registry", out_dir=tmp_path / "services",
                 check_model=False, workers=2, torch_threads=2)
    return service_settings(d)


@pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed (make fleet-deps)")
def test_nginx_accepts_the_config_and_the_server_block(cfg, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    full = tmp_path / "nginx.conf"
    full.write_text(render_nginx(cfg, ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"], "127.0.0.1:8080",
                                 options=NginxOptions(state_dir=str(state))))
    outer = tmp_path / "outer.conf"
    block = tmp_path / "kit-tools.conf"
    block.write_text(render_nginx(cfg, ["127.0.0.1:8001"], "127.0.0.1:8081", server_block=True))
    outer.write_text(f"pid {state}/outer.pid;\nevents {{}}\nhttp {{\n    include {block};\n}}\n")
    broken = tmp_path / "broken.conf"
    broken.write_text(full.read_text().replace("keepalive 32;", "keepalive thirty-two;"))
    for conf, ok in ((full, True), (outer, True), (broken, False)):
        res = subprocess.run([NGINX, "-t", "-c", str(conf), "-e", str(state / "stderr.log")],
                             capture_output=True, text=True)
        assert (res.returncode == 0) == ok, (conf, res.stderr)


@pytest.mark.skipif(PROMTOOL is None, reason="Debian's prometheus (promtool) is not installed (make fleet-deps)")
def test_promtool_accepts_config_and_rules(cfg, tmp_path):
    write_files(render_prometheus(cfg, ["127.0.0.1:8001", "127.0.0.1:8002"]), tmp_path)
    rules = tmp_path / "kit-tools.rules.yml"
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", str(rules)]):
        res = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "bad.rules.yml"
    bad.write_text(rules.read_text().replace("histogram_quantile(0.99,", "histogram_quantile(0.99"))
    assert subprocess.run([PROMTOOL, "check", "rules", str(bad)], capture_output=True).returncode != 0


def test_k8s_manifests_match_the_kubernetes_schemas(cfg):
    import kubernetes_validate as kv
    files = render_k8s(cfg, K8sOptions(image="registry.example/kit-tools:1", replicas=3, namespace="ml",
                                       storage_class="nfs-client"))
    docs = {name: yaml.safe_load(text) for name, text in files.items()}
    assert {d["kind"] for d in docs.values()} == {"Deployment", "Service", "PodDisruptionBudget",
                                                  "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for version in K8S_VERSIONS:
        for _name, doc in docs.items():
            kv.validate(doc, version, strict=True)  # raises on any schema violation or unknown field
    # the check can fail: a typo'd field and a wrong type are refused
    dep = docs["deployment.yaml"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)
    hpa = docs["hpa.yaml"]
    hpa["spec"]["minReplicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_k8s_manifests_of_a_bucket_service_match_the_kubernetes_schemas(tmp_path):
    import kubernetes_validate as kv
    d = generate("tools", "digits", registry="s3://my-bucket/kit", out_dir=tmp_path / "services",
                 check_model=False, workers=2, torch_threads=2)
    for opts in ({"cache_size": "10Gi"}, {"s3_secret": ""}):
        files = render_k8s(service_settings(d), K8sOptions(image="registry.example/kit-tools:1", **opts))
        assert "registry-pvc.yaml" not in files
        for version in K8S_VERSIONS:
            for text in files.values():
                kv.validate(yaml.safe_load(text), version, strict=True)
