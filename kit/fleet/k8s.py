"""Kubernetes manifests for a fleet (``kit fleet k8s``).

A Deployment of the packed image (``kit pack --image``) whose pods follow one registry, a Service, a
PodDisruptionBudget and a HorizontalPodAutoscaler. A folder registry is a ReadWriteMany volume (a claim made
here or given); a bucket (service.toml's ``registry = "s3://..."``) needs no volume: each pod gets an
emptyDir for its local verified cache (``KIT_CACHE_DIR``) and the store's ``AWS_*`` settings from a Secret
(``envFrom``), or none for a pod identity. Probes use the
service's own endpoints (readiness ``/readyz``: a model is loaded; liveness ``/healthz``); a preStop
pause lets endpoints drop the pod before gunicorn's graceful stop begins, and the termination grace
period covers both, so no in-flight request is cut. CPU requests follow the worker plan
(workers x torch threads per worker).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kit.errors import ServiceError
from kit.fleet._common import parse_address, template_env
from kit.registry.storage import is_url
from kit.serving.config import ServiceConfig, worker_plan

_DNS = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


@dataclass(frozen=True)
class K8sOptions:
    """What service.toml cannot say about a cluster.

    cpus: cores per pod when service.toml leaves workers at 0 (auto); the plan is computed for them.
    memory: memory request and limit per pod (default 512Mi per worker).
    registry_claim: an existing ReadWriteMany claim; None creates ``<name>-registry`` of registry_size.
    drain_seconds: the preStop pause (endpoints need a few seconds to drop a terminating pod).
    s3_secret: for a bucket registry, the Secret whose keys become the pod's environment (AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL); None: ``<name>-s3``; "": none (a pod identity).
    cache_size: for a bucket registry, the cache emptyDir's sizeLimit (None: no limit).
    """

    image: str
    replicas: int = 2
    max_replicas: int = 0  # 0: 3 x replicas
    namespace: str | None = None
    cpus: int = 2
    memory: str | None = None
    registry_claim: str | None = None
    registry_size: str = "20Gi"
    storage_class: str | None = None
    cpu_target: int = 70  # HPA: average CPU utilisation (% of requests)
    drain_seconds: int = 5
    s3_secret: str | None = None
    cache_size: str | None = None


def k8s_name(service: str) -> str:
    """A DNS-1123 name for the service (lowercase; ``_`` and ``.`` become ``-``)."""
    name = "kit-" + re.sub(r"[_.]+", "-", service.lower()).strip("-")
    if not _DNS.fullmatch(name):
        raise ServiceError(f"Service name {service!r} does not make a Kubernetes name ({name!r} is not DNS-1123: "
                           "lowercase letters, digits and '-', at most 63).")
    return name


def render_k8s(cfg: ServiceConfig, options: K8sOptions) -> dict[str, str]:
    """``{file name: YAML}``: deployment, service, pdb, hpa (and the registry claim unless given or the
    registry is a bucket)."""
    o = options
    if not o.image or any(c.isspace() for c in o.image):
        raise ServiceError(f"Image {o.image!r} is not an image reference such as registry.example/kit-demo:1.")
    if o.replicas < 1 or o.cpus < 1 or o.drain_seconds < 0 or not 1 <= o.cpu_target <= 100:
        raise ServiceError(f"Invalid options {o}: replicas >= 1, cpus >= 1, drain >= 0, 1 <= cpu target <= 100.")
    max_replicas = o.max_replicas or 3 * o.replicas
    if max_replicas < o.replicas:
        raise ServiceError(f"The most replicas ({max_replicas}) is below the replicas asked for ({o.replicas}).")
    for q, what in ((o.memory, "memory"), (o.registry_size, "registry size"), (o.cache_size, "cache size")):
        if q is not None and not _QUANTITY.fullmatch(q):
            raise ServiceError(f"{what} {q!r} is not a Kubernetes quantity such as 2Gi or 512Mi.")
    for value, what in ((o.namespace, "namespace"), (o.registry_claim, "registry claim"),
                        (o.storage_class, "storage class"), (o.s3_secret or None, "S3 secret")):
        if value is not None and not _DNS.fullmatch(value):
            raise ServiceError(f"{what} {value!r} is not a DNS-1123 name.")
    _, port = parse_address(cfg.bind, "service.toml [service] bind")
    workers, torch_threads = worker_plan(cfg, cores=o.cpus)
    name = k8s_name(cfg.name)
    bucket = str(cfg.registry) if is_url(cfg.registry) else None
    if bucket is not None and (o.registry_claim or o.storage_class):
        raise ServiceError(f"{cfg.name}'s registry is the bucket {bucket}: pods mount no registry claim, so "
                           "a registry claim or storage class does not apply; leave both unset.")
    if bucket is None and (o.s3_secret is not None or o.cache_size is not None):
        raise ServiceError(f"{cfg.name}'s registry is the folder {cfg.registry}, not a bucket: an S3 secret and "
                           "a cache size apply only to a service whose service.toml names s3://bucket/prefix; leave both unset.")
    # startup: the model loads before a worker accepts a connection, within gunicorn's timeout
    startup_failures = math.ceil(cfg.timeout / 2) + 5
    ctx = {
        "name": name, "service": cfg.name, "model": cfg.model, "o": o, "port": port, "workers": workers,
        "torch_threads": torch_threads, "cpu": workers * torch_threads, "max_replicas": max_replicas,
        "memory": o.memory or f"{512 * workers}Mi", "claim": o.registry_claim or f"{name}-registry",
        "grace": o.drain_seconds + cfg.graceful_timeout + 5, "graceful_timeout": cfg.graceful_timeout,
        "startup_failures": startup_failures, "auto_workers": cfg.workers == 0,
        "max_unavailable": 1, "bucket": bucket,
        "secret": (f"{name}-s3" if o.s3_secret is None else o.s3_secret) if bucket else None,
    }
    env = template_env()
    files = {f"{kind}.yaml": env.get_template(f"k8s-{kind}.yaml.j2").render(**ctx)
             for kind in ("deployment", "service", "pdb", "hpa")}
    if o.registry_claim is None and bucket is None:
        files["registry-pvc.yaml"] = env.get_template("k8s-registry-pvc.yaml.j2").render(**ctx)
    return files
