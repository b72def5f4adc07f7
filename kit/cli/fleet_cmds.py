"""`kit fleet ...`: configuration for nginx, Prometheus and Kubernetes from a service (thin over kit.fleet)."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli._common import emit_json, json_option

_service_arg = click.argument("service_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group("fleet")
def fleet() -> None:
    """Run a service on many instances: nginx, Prometheus and Kubernetes files from services/NAME."""


def _written(paths: list[Path], as_json: bool) -> None:
    if as_json:
        emit_json({"written": [str(p) for p in paths]})
    else:
        for p in paths:
            click.echo(f"wrote {p}")


@fleet.command("nginx")
@_service_arg
@click.option("--upstream", "upstreams", multiple=True, required=True, metavar="HOST:PORT",
              help="An instance of the service (repeatable).")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where nginx listens.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write (nginx.conf, or the server block with --server-block).")
@click.option("--server-block", is_flag=True, help="Only the http-level part, to include in an existing config.")
@click.option("--max-fails", type=click.IntRange(0), default=1, show_default=True,
              help="Failed attempts that leave an instance out (passive health).")
@click.option("--fail-timeout", type=click.IntRange(1), default=5, show_default=True,
              help="Seconds the failures are counted over, and an instance is left out for.")
@click.option("--tries", type=click.IntRange(1), default=3, show_default=True,
              help="Attempts per request across instances.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for nginx's pid, logs and temp files (default: the system's).")
@click.option("--user", "run_as", default=None, help="nginx worker user (the `user` directive).")
@json_option
def nginx_cmd(service_dir: Path, upstreams: tuple[str, ...], listen: str, output: Path, server_block: bool,
              max_fails: int, fail_timeout: int, tries: int, state_dir: Path | None, run_as: str | None,
              as_json: bool) -> None:
    """nginx in front of instances of services/NAME (keep-alive, retries, passive health)."""
    from kit.fleet import service_settings, write_files
    from kit.fleet.nginx import NginxOptions, render_nginx

    opts = NginxOptions(max_fails=max_fails, fail_timeout=fail_timeout, tries=tries,
                        state_dir=str(state_dir) if state_dir else None, run_as=run_as)
    text = render_nginx(service_settings(service_dir), upstreams, listen, server_block=server_block, options=opts)
    _written(write_files({output.name: text}, output.parent), as_json)


@fleet.command("prometheus")
@_service_arg
@click.option("--target", "targets", multiple=True, required=True, metavar="HOST:PORT",
              help="An instance to scrape (repeatable).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for prometheus.yml and kit-NAME.rules.yml.")
@click.option("--scrape-interval", default="15s", show_default=True)
@click.option("--window", default="5m", show_default=True, help="rate() window of the recorded series.")
@click.option("--error-ratio", type=float, default=0.01, show_default=True, help="5xx share per version that alerts.")
@click.option("--p99-ms", type=float, default=500.0, show_default=True, help="p99 latency per version that alerts.")
@click.option("--for", "for_", default="5m", show_default=True, help="How long a condition holds before it fires.")
@json_option
def prometheus_cmd(service_dir: Path, targets: tuple[str, ...], out_dir: Path, scrape_interval: str, window: str,
                   error_ratio: float, p99_ms: float, for_: str, as_json: bool) -> None:
    """Prometheus scrape config and alert rules for instances of services/NAME."""
    from kit.fleet import service_settings, write_files
    from kit.fleet.prometheus import PrometheusOptions, render_prometheus

    opts = PrometheusOptions(scrape_interval=scrape_interval, window=window, error_ratio=error_ratio,
                             p99_ms=p99_ms, for_=for_)
    _written(write_files(render_prometheus(service_settings(service_dir), targets, opts), out_dir), as_json)


@fleet.command("k8s")
@_service_arg
@click.option("--image", required=True, help="The image `kit pack --image` built, as your cluster pulls it.")
@click.option("--replicas", type=click.IntRange(1), default=2, show_default=True)
@click.option("--max-replicas", type=click.IntRange(0), default=0, help="HPA ceiling (default 3 x replicas).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the manifests (kubectl apply -f DIR).")
@click.option("--namespace", default=None)
@click.option("--cpus", type=click.IntRange(1), default=2, show_default=True,
              help="Cores per pod when service.toml leaves workers at 0 (auto).")
@click.option("--memory", default=None, help="Memory per pod, e.g. 2Gi (default 512Mi per worker).")
@click.option("--registry-claim", default=None, help="An existing ReadWriteMany claim holding the registry "
              "(default: create NAME-registry).")
@click.option("--registry-size", default="20Gi", show_default=True)
@click.option("--storage-class", default=None, help="Storage class of the created claim (an RWX one: NFS, EFS, ...).")
@click.option("--s3-secret", default=None, help="A bucket registry: the Secret holding AWS_ACCESS_KEY_ID, "
              "AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL (default NAME-s3; '' for a pod identity).")
@click.option("--cache-size", default=None, help="A bucket registry: sizeLimit of each pod's cache emptyDir.")
@json_option
def k8s_cmd(service_dir: Path, image: str, replicas: int, max_replicas: int, out_dir: Path, namespace: str | None,
            cpus: int, memory: str | None, registry_claim: str | None, registry_size: str,
            storage_class: str | None, s3_secret: str | None, cache_size: str | None, as_json: bool) -> None:
    """Deployment, Service, PodDisruptionBudget and HorizontalPodAutoscaler for services/NAME (and the
    registry's ReadWriteMany claim, unless the registry is a bucket)."""
    from kit.fleet import service_settings, write_files
    from kit.fleet.k8s import K8sOptions, render_k8s

    opts = K8sOptions(image=image, replicas=replicas, max_replicas=max_replicas, namespace=namespace, cpus=cpus,
                      memory=memory, registry_claim=registry_claim, registry_size=registry_size,
                      storage_class=storage_class, s3_secret=s3_secret, cache_size=cache_size)
    _written(write_files(render_k8s(service_settings(service_dir), opts), out_dir), as_json)


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(fleet)
