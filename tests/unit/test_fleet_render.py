"""kit.fleet renderers: what the generated nginx, Prometheus and Kubernetes files say, and the errors for
bad input. The tools themselves check the files in tests/integration/test_fleet_tools.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kit.cli import cli
from kit.errors import ServiceError
from kit.fleet import parse_address, service_settings
from kit.fleet.k8s import K8sOptions, k8s_name, render_k8s
from kit.fleet.nginx import NginxOptions, render_nginx
from kit.fleet.prometheus import PrometheusOptions, render_prometheus
from kit.servicegen import generate


@pytest.fixture
def service(tmp_path: Path) -> Path:
    return generate("fleet_svc", "digits", registry=tmp_path / "registry", out_dir=tmp_path / "services",
                    check_model=False, workers=2, torch_threads=1, max_body_bytes=1234567, timeout=45,
                    graceful_timeout=20, bind="127.0.0.1:8123")


def test_parse_address():
    assert parse_address("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert parse_address("[::1]:80") == ("[::1]", 80)
    assert parse_address("box-2.example:9000") == ("box-2.example", 9000)
    for bad in ("127.0.0.1", "host:0", "host:70000", ":80", "a b:80", "host:http"):
        with pytest.raises(ServiceError, match="HOST:PORT"):
            parse_address(bad)


def test_nginx_config_follows_service_toml(service):
    cfg = service_settings(service)
    text = render_nginx(cfg, ["127.0.0.1:8001", "10.0.0.2:8001"], "0.0.0.0:80")
    assert "client_max_body_size 1234567;" in text  # [limits] max_body_bytes
    assert "proxy_read_timeout 45s;" in text  # [service] timeout
    assert "server 127.0.0.1:8001 max_fails=1 fail_timeout=5s;" in text
    assert "server 10.0.0.2:8001 max_fails=1 fail_timeout=5s;" in text
    assert "keepalive 32;" in text and 'proxy_set_header Connection "";' in text
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text
    assert "listen 0.0.0.0:80;" in text and text.startswith("# Complete nginx.conf")
    block = render_nginx(cfg, ["127.0.0.1:8001"], "0.0.0.0:80", server_block=True,
                         options=NginxOptions(tries=2, max_fails=3, fail_timeout=10))
    assert "events" not in block and "upstream kit_fleet_svc {" in block
    assert "proxy_next_upstream_tries 2;" in block and "max_fails=3 fail_timeout=10s" in block


def test_nginx_refuses_bad_input(service):
    cfg = service_settings(service)
    with pytest.raises(ServiceError, match="at least one instance"):
        render_nginx(cfg, [], "127.0.0.1:80")
    with pytest.raises(ServiceError, match="listed twice"):
        render_nginx(cfg, ["127.0.0.1:1", "127.0.0.1:1"], "127.0.0.1:80")
    with pytest.raises(ServiceError, match="listen address"):
        render_nginx(cfg, ["127.0.0.1:1"], "80")
    with pytest.raises(ServiceError, match="underscore"):
        render_nginx(cfg.with_(user_header="X_User"), ["127.0.0.1:1"], "127.0.0.1:80")


def test_prometheus_files(service):
    cfg = service_settings(service)
    files = render_prometheus(cfg, ["127.0.0.1:8001", "127.0.0.1:8002"], PrometheusOptions(p99_ms=250))
    conf = yaml.safe_load(files["prometheus.yml"])
    job = conf["scrape_configs"][0]
    assert job["job_name"] == "kit-fleet_svc" and conf["rule_files"] == ["kit-fleet_svc.rules.yml"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    rules = yaml.safe_load(files["kit-fleet_svc.rules.yml"])
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == {"KitInstanceDown", "KitErrorRatioHigh", "KitLatencyP99High", "KitReloadFailed",
                           "KitCanaryErrorsWorse", "KitCanaryLatencyWorse"}
    assert "> 0.25" in alerts["KitLatencyP99High"]["expr"]
    assert "{{ $labels.version }}" in alerts["KitErrorRatioHigh"]["annotations"]["summary"]
    with pytest.raises(ServiceError, match="Prometheus duration"):
        render_prometheus(cfg, ["127.0.0.1:1"], PrometheusOptions(window="5 minutes"))


def test_k8s_manifests(service):
    cfg = service_settings(service)
    files = render_k8s(cfg, K8sOptions(image="registry.example/kit-fleet:1", replicas=3, namespace="ml"))
    assert set(files) == {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml", "registry-pvc.yaml"}
    dep = yaml.safe_load(files["deployment.yaml"])
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["metadata"] == {"name": "kit-fleet-svc", "namespace": "ml", "labels": dep["metadata"]["labels"]}
    assert dep["spec"]["replicas"] == 3
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"][0]["containerPort"] == 8123
    assert {"name": "KIT_BIND", "value": "0.0.0.0:8123"} in c["env"]
    drain = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + 20  # preStop + graceful_timeout fit in the grace period
    assert c["resources"]["requests"]["cpu"] == "2"  # workers 2 x torch threads 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    pvc = yaml.safe_load(files["registry-pvc.yaml"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    hpa = yaml.safe_load(files["hpa.yaml"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    own = render_k8s(cfg, K8sOptions(image="x:1", registry_claim="shared-registry"))
    assert "registry-pvc.yaml" not in own and "claimName: \"shared-registry\"" in own["deployment.yaml"]


def test_k8s_for_a_bucket_service_has_no_claim_a_cache_and_a_secret(tmp_path: Path):
    svc = generate("bucket_svc", "digits", registry="s3://my-bucket/kit", out_dir=tmp_path / "services",
                   check_model=False, workers=2, torch_threads=1)
    cfg = service_settings(svc)
    files = render_k8s(cfg, K8sOptions(image="x:1", cache_size="8Gi"))
    assert set(files) == {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"}  # no registry claim
    dep = yaml.safe_load(files["deployment.yaml"])
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KIT_RUN_REGISTRY"] == "s3://my-bucket/kit" and env["KIT_CACHE_DIR"] == "/var/cache/kit"
    assert c["envFrom"] == [{"secretRef": {"name": "kit-bucket-svc-s3"}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "8Gi"}}
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    assert {"name": "cache", "mountPath": "/var/cache/kit"} in c["volumeMounts"]
    assert "kubectl create secret generic kit-bucket-svc-s3" in files["deployment.yaml"]

    named = yaml.safe_load(render_k8s(cfg, K8sOptions(image="x:1", s3_secret="team-s3"))["deployment.yaml"])
    c = named["spec"]["template"]["spec"]["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    assert yaml.safe_load(render_k8s(cfg, K8sOptions(image="x:1"))["deployment.yaml"])[
        "spec"]["template"]["spec"]["volumes"][0] == {"name": "cache", "emptyDir": {}}
    identity = yaml.safe_load(render_k8s(cfg, K8sOptions(image="x:1", s3_secret=""))["deployment.yaml"])
    assert "envFrom" not in identity["spec"]["template"]["spec"]["containers"][0]  # a pod identity instead
    with pytest.raises(ServiceError, match="no registry claim"):
        render_k8s(cfg, K8sOptions(image="x:1", registry_claim="shared"))
    with pytest.raises(ServiceError, match="DNS-1123"):
        render_k8s(cfg, K8sOptions(image="x:1", s3_secret="Bad_Name"))


def test_k8s_for_a_folder_service_refuses_bucket_options(service):
    with pytest.raises(ServiceError, match="not a bucket"):
        render_k8s(service_settings(service), K8sOptions(image="x:1", s3_secret="team-s3"))


def test_k8s_refuses_bad_input(service):
    cfg = service_settings(service)
    assert k8s_name("Demo_v2.x") == "kit-demo-v2-x"
    with pytest.raises(ServiceError, match="image reference"):
        render_k8s(cfg, K8sOptions(image="has space:1"))
    with pytest.raises(ServiceError, match="quantity"):
        render_k8s(cfg, K8sOptions(image="x:1", memory="2 GB"))
    with pytest.raises(ServiceError, match="most replicas"):
        render_k8s(cfg, K8sOptions(image="x:1", replicas=4, max_replicas=2))


def test_cli_writes_files_and_reports_errors(service, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(cli, ["fleet", "nginx", str(service), "--upstream", "127.0.0.1:8001", "--listen",
                              "127.0.0.1:8080", "-o", str(out / "nginx.conf"), "--server-block"])
    assert res.exit_code == 0, res.output
    assert "upstream kit_fleet_svc" in (out / "nginx.conf").read_text()
    res = runner.invoke(cli, ["fleet", "prometheus", str(service), "--target", "127.0.0.1:8001", "-o", str(out)])
    assert res.exit_code == 0 and (out / "kit-fleet_svc.rules.yml").is_file(), res.output
    res = runner.invoke(cli, ["fleet", "k8s", str(service), "--image", "x:1", "--replicas", "2", "-o",
                              str(out / "k8s"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "k8s").glob("*.yaml"))) == 5
    res = runner.invoke(cli, ["fleet", "nginx", str(service), "--upstream", "nope", "--listen", "127.0.0.1:8080",
                              "-o", str(out / "x.conf")])
    assert res.exit_code == 2 and "kit: error: upstream 'nope' is not HOST:PORT" in res.output


def test_fleet_names_and_addresses_refuse_trailing_newlines_and_non_ascii_digits():
    from kit.fleet._common import parse_address

    for bad in ("host\n:8000", "svc\n.local:80", "127.0.0.1:８０", "127.0.0.1:²"):
        with pytest.raises(ServiceError):
            parse_address(bad, "upstream")
