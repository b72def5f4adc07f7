"""A service's settings: ``service.toml`` plus the two run-time overrides, resolved once at the edge.

``KIT_REGISTRY`` overrides ``[model] registry`` and ``KIT_BIND`` overrides ``[service] bind``; the
generated ``app.py`` / ``gunicorn.conf.py`` pass ``os.environ`` in explicitly (library code never
reads it). Relative paths are relative to the service folder. Unknown keys are refused, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit import backends
from kit import service_settings as settings
from kit.errors import ServiceError
from kit.registry.names import is_sha256_hex

if TYPE_CHECKING:
    from kit.serving.guard_stats import GuardSettings
    from kit.serving.recorder import CaptureSettings
    from kit.signing import Keyring

log = logging.getLogger(__name__)

SERVICE_FILE = settings.SERVICE_FILE
_d = settings.default


def _o(option: str) -> Any:
    return settings.BY_OPTION[option].default

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class JwtSettings:
    """``[auth.jwt]``: bearer JWTs checked with a shared secret (HS*) or a public key / JWKS file (RS*, PS*,
    ES*, EdDSA). ``secret`` is the value of ``secret_env`` in the service's environment (never printed)."""

    algorithms: tuple[str, ...] = _d("auth.jwt", "algorithms")
    secret_env: str = ""
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    issuer: str = ""
    audience: tuple[str, ...] = ()
    leeway: float = _d("auth.jwt", "leeway")  # seconds of clock skew allowed on exp, nbf and iat
    client_claim: str = _d("auth.jwt", "client_claim")  # the client for rate limits and sticky routing
    required_claims: tuple[str, ...] = _d("auth.jwt", "required_claims")

    @property
    def hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True)
class ServiceConfig:
    """Resolved settings of one generated service. Paths are absolute. Defaults: the declaration in
    :mod:`kit.service_settings` (what a generated service.toml holds)."""

    name: str
    model: str
    registry: Path | str  # a folder, or an s3://bucket/prefix URL (kit.registry.remote)
    service_dir: Path = Path(".")
    bind: str = _o("bind")
    device: str = _o("device")
    workers: int = _o("workers")  # 0: min(cores, 4)
    torch_threads: int = _o("torch_threads")  # 0: max(1, cores // workers), so workers x torch threads <= cores
    timeout: int = _o("timeout")  # above model load time: the master kills a silent worker after this
    graceful_timeout: int = _o("graceful_timeout")
    keepalive: int = _o("keepalive")
    max_requests: int = _o("max_requests")
    max_requests_jitter: int = _o("max_requests_jitter")
    preload: bool = _o("preload")  # the master imports torch & co (never CUDA) so forked workers start in ~0.3 s
    header_timeout: float = _o("header_timeout")  # asgi: seconds for a request head to arrive (then the connection closes)
    body_timeout: float = _o("body_timeout")  # asgi: seconds for a request body to arrive after its head
    check_env: bool = _o("check_env")
    backend: str = backends.DEFAULT
    max_artifact_bytes: int = _o("max_artifact_bytes")  # [model]: the most a model's files may expand to when opened
    max_tensor_bytes: int = _o("max_tensor_bytes")  # [model]: the most one tensor a program makes may hold (0: derived)
    version_header: str = _o("version_header")  # "" disables the override
    user_header: str = _o("user_header")
    poll_interval: float = _o("poll_interval")
    retry_max: float = _o("retry_max")
    batching: bool = _o("batching")
    max_batch: int = _o("max_batch")
    max_wait_ms: float = _o("max_wait_ms")
    max_body_bytes: int = _o("max_body_bytes")
    rate_limit: float = _o("rate_limit")  # requests/second per client per worker; 0: off
    rate_burst: int = _o("rate_burst")  # 0: max(1, rate_limit)
    api_keys_sha256: tuple[str, ...] = ()
    keys_file: Path | None = None
    trusted_keys: tuple[str, ...] = ()  # [trust] public_keys: versions must be signed by one of these
    jwt: JwtSettings | None = None  # [auth.jwt] enabled = true
    access_log: bool = _o("access_log")
    canary_guard: GuardSettings | None = None  # [canary_guard]; absent: off
    capture: CaptureSettings | None = None  # [capture]; absent: off
    extra: dict[str, Any] = field(default_factory=dict)


    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys_sha256) or self.keys_file is not None or self.jwt is not None

    def with_(self, **changes: Any) -> ServiceConfig:
        return dataclasses.replace(self, **changes)


def load_service_config(service_dir: Path | str, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read ``<service_dir>/service.toml`` (:func:`kit.service_settings.read_service_toml`: unknown keys,
    wrong types and out-of-range values refused); apply ``KIT_REGISTRY``, ``KIT_BIND`` and
    ``KIT_API_KEYS_SHA256`` (extra key digests, comma-separated) from ``environ``."""
    service_dir = Path(service_dir).resolve()
    path = service_dir / SERVICE_FILE
    doc = settings.read_service_toml(service_dir)
    values: dict[str, Any] = {}
    for section, body in doc.items():
        if section not in _TABLES:  # flat sections: the option name is the ServiceConfig field
            values.update({settings.BY_SECTION[section][k].option: v for k, v in body.items()})
    environ = {} if environ is None else environ
    if environ.get("KIT_REGISTRY"):
        values["registry"] = environ["KIT_REGISTRY"]
    if environ.get("KIT_BIND"):
        values["bind"] = environ["KIT_BIND"]
    if "://" not in str(values["registry"]):  # an s3:// URL stays as it is (kit.registry.remote.open_storage)
        registry = Path(values["registry"]).expanduser()
        values["registry"] = (registry if registry.is_absolute() else service_dir / registry).resolve()
    values["api_keys_sha256"] = _api_keys(values.get("api_keys_sha256", ()), path, environ)
    if values.get("keys_file"):
        kf = Path(values["keys_file"]).expanduser()
        values["keys_file"] = kf if kf.is_absolute() else service_dir / kf
    else:
        values.pop("keys_file", None)
    if "auth.jwt" in doc:
        values["jwt"] = _jwt_settings(doc["auth.jwt"], path, service_dir, environ)
    if "canary_guard" in doc:
        from kit.serving.guard_stats import parse_guard_settings

        values["canary_guard"] = parse_guard_settings(doc["canary_guard"], str(path))
    if "capture" in doc:
        from kit.serving.recorder import parse_capture_settings

        values["capture"] = parse_capture_settings(doc["capture"], str(path))
    values["trusted_keys"] = _trusted_keys(list(values.get("trusted_keys", ())), path)
    return ServiceConfig(service_dir=service_dir, **values)


# tables that become their own settings objects (not ServiceConfig fields)
_TABLES = ("auth.jwt", "canary_guard", "capture")


def _api_keys(keys: tuple[str, ...], path: Path, environ: Mapping[str, str]) -> tuple[str, ...]:
    for k in keys:
        if not is_sha256_hex(k):
            raise ServiceError(f"{path}: [auth] api_keys_sha256 holds {k!r}, not a lowercase sha256 hex "
                               "digest. Hash keys with `kit service hash-key KEY` (or sha256sum).")
    # KIT_API_KEYS_SHA256 adds digests (comma-separated) from the environment, e.g. a secret store's,
    # and turns auth on if the file had none. It never removes a key.
    for k in (x.strip() for x in environ.get("KIT_API_KEYS_SHA256", "").split(",")):
        if not k:
            continue
        if not is_sha256_hex(k):
            raise ServiceError(f"KIT_API_KEYS_SHA256 holds {k[:16]!r}…, not a lowercase sha256 hex digest. "
                               "Hash keys with `kit service hash-key KEY` (or sha256sum).")
        keys = (*keys, k)
    return tuple(keys)


def _jwt_settings(table: Mapping[str, Any], path: Path, service_dir: Path, environ: Mapping[str, str]) -> JwtSettings | None:
    """Check ``[auth.jwt]`` beyond its declared types and ranges (no key material is read here:
    :mod:`kit.serving.security` does that)."""
    where = f"{path}: [auth.jwt]"
    v = dict(table)
    if not v.pop("enabled", False):
        return None
    for key in ("algorithms", "audience", "required_claims"):
        if key in v and not all(v[key]):
            raise ServiceError(f"{where} {key} must be a list of non-empty strings, got {list(v[key])!r}.")
    algs = v.get("algorithms", ("HS256",))
    unknown = [a for a in algs if a not in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS]
    if not algs or unknown:
        raise ServiceError(f"{where} algorithms = {list(algs)!r}: use HS256/HS384/HS512 (a shared secret) or "
                           f"{', '.join(ASYMMETRIC_ALGORITHMS)} (a public key); 'none' is never accepted.")
    if len({a in HMAC_ALGORITHMS for a in algs}) > 1:
        raise ServiceError(f"{where} algorithms = {list(algs)!r} mixes shared-secret (HS*) and public-key "
                           "algorithms; a service checks one kind (mixing them invites algorithm confusion).")
    for key in ("secret_file", "public_key_file", "jwks_file"):
        if v.get(key):
            p = Path(v[key]).expanduser()
            v[key] = p if p.is_absolute() else service_dir / p
        else:
            v.pop(key, None)
    sources = [k for k in ("secret_env", "secret_file", "public_key_file", "jwks_file") if v.get(k)]
    want = ("secret_env", "secret_file") if algs[0] in HMAC_ALGORITHMS else ("public_key_file", "jwks_file")
    if len(sources) != 1 or sources[0] not in want:
        raise ServiceError(f"{where}: algorithms {list(algs)} need exactly one of {' or '.join(want)} "
                           f"(have {sources or 'none'}).")
    if v.get("secret_env"):
        v["secret"] = environ.get(v["secret_env"]) or None
    return JwtSettings(**v)


def _trusted_keys(keys: list[object], path: Path) -> tuple[str, ...]:
    from kit.errors import SigningKeyError
    from kit.signing import Trust

    try:
        Trust.from_texts([str(k) for k in keys], f"{path}: [trust] public_keys")
    except SigningKeyError as exc:
        raise ServiceError(str(exc)) from exc
    return tuple(str(k) for k in keys)


def service_keyring(cfg: ServiceConfig) -> Keyring | None:
    """The :class:`kit.signing.Keyring` a service's registry verifies against: ``[trust] public_keys``
    only (a service never signs). None, with a warning, when service.toml trusts no key."""
    from kit.signing import Keyring, Trust

    if not cfg.trusted_keys:
        log.warning("%s: service.toml has no [trust] public_keys, so model versions are NOT signature-checked "
                    "(sha256 only: anyone who can write the registry can change what is served). Add the "
                    "project's key (`kit keys show`) or regenerate the service with `kit service new --force`.",
                    cfg.service_dir / SERVICE_FILE)
        return None
    return Keyring.verify_only(Trust.from_texts(cfg.trusted_keys))


def cpu_count() -> int:
    """Cores this process may use (respects affinity / cgroup cpusets where the OS reports them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_plan(cfg: ServiceConfig, cores: int | None = None) -> tuple[int, int]:
    """(gunicorn workers, torch threads per worker): by default workers x torch threads <= cores."""
    cores = cores or cpu_count()
    workers = cfg.workers or min(cores, 4)
    torch_threads = cfg.torch_threads or max(1, cores // workers)
    return workers, torch_threads
