"""A service's settings: ``service.toml`` plus the two run-time overrides, resolved once at the edge.

``KIT_REGISTRY`` overrides ``[model] registry`` and ``KIT_BIND`` overrides ``[service] bind``; the
generated ``wsgi.py`` / ``gunicorn.conf.py`` pass ``os.environ`` in explicitly (library code never
reads it). Relative paths are relative to the service folder. Unknown keys are refused, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.errors import ServiceError

log = logging.getLogger(__name__)

SERVICE_FILE = "service.toml"

# section -> {key: (field name, type)}
_SCHEMA: dict[str, dict[str, tuple[str, type]]] = {
    "service": {
        "name": ("name", str), "bind": ("bind", str), "device": ("device", str),
        "workers": ("workers", int), "threads": ("threads", int), "torch_threads": ("torch_threads", int),
        "timeout": ("timeout", int), "graceful_timeout": ("graceful_timeout", int),
        "keepalive": ("keepalive", int), "max_requests": ("max_requests", int),
        "max_requests_jitter": ("max_requests_jitter", int), "preload": ("preload", bool),
        "engine": ("engine", str), "header_timeout": ("header_timeout", float),
        "body_timeout": ("body_timeout", float),
    },
    "model": {"name": ("model", str), "registry": ("registry", str), "check_env": ("check_env", bool),
              "max_artifact_bytes": ("max_artifact_bytes", int)},
    "routing": {"version_header": ("version_header", str), "user_header": ("user_header", str)},
    "reload": {"poll_interval": ("poll_interval", float), "retry_max": ("retry_max", float)},
    "batching": {"enabled": ("batching", bool), "max_batch": ("max_batch", int),
                 "max_wait_ms": ("max_wait_ms", float)},
    "limits": {"max_body_bytes": ("max_body_bytes", int), "rate_limit": ("rate_limit", float),
               "rate_burst": ("rate_burst", int)},
    "auth": {"api_keys_sha256": ("api_keys_sha256", list), "keys_file": ("keys_file", str)},
    "logging": {"access_log": ("access_log", bool)},
    "trust": {"public_keys": ("trusted_keys", list)},
}
# whole tables parsed by their own module: section -> field name (see _parse_table)
_TABLES = {"canary_guard": "canary_guard", "capture": "capture"}
# [auth.jwt]: key -> type (the fields of JwtSettings; "enabled" turns it on)
_JWT_SCHEMA: dict[str, type] = {
    "enabled": bool, "algorithms": list, "secret_env": str, "secret_file": str, "public_key_file": str,
    "jwks_file": str, "issuer": str, "audience": list, "leeway": float, "client_claim": str,
    "required_claims": list,
}
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class JwtSettings:
    """``[auth.jwt]``: bearer JWTs checked with a shared secret (HS*) or a public key / JWKS file (RS*, PS*,
    ES*, EdDSA). ``secret`` is the value of ``secret_env`` in the service's environment (never printed)."""

    algorithms: tuple[str, ...] = ("HS256",)
    secret_env: str = ""
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    issuer: str = ""
    audience: tuple[str, ...] = ()
    leeway: float = 30.0  # seconds of clock skew allowed on exp, nbf and iat
    client_claim: str = "sub"  # the client for rate limits and sticky routing
    required_claims: tuple[str, ...] = ("exp",)

    @property
    def hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True)
class ServiceConfig:
    """Resolved settings of one generated service. Paths are absolute."""

    name: str
    model: str
    registry: Path
    service_dir: Path = Path(".")
    bind: str = "127.0.0.1:8000"
    device: str = "cpu"
    workers: int = 0  # 0: min(cores, 4)
    threads: int = 4  # gthread request threads per worker (measured: 4 beat 2 and 8 at c=32 on 2 cores)
    torch_threads: int = 0  # 0: max(1, cores // workers), so workers x torch threads <= cores
    timeout: int = 60  # above model load time: the master kills a silent worker after this
    graceful_timeout: int = 30
    keepalive: int = 5
    max_requests: int = 200_000
    max_requests_jitter: int = 20_000
    preload: bool = True  # the master imports torch & co (never CUDA) so forked workers start in ~0.3 s
    engine: str = "asgi"  # uvicorn workers, async handlers, an inference thread (the only engine)
    header_timeout: float = 10.0  # asgi: seconds for a request head to arrive (then the connection closes)
    body_timeout: float = 30.0  # asgi: seconds for a request body to arrive after its head
    check_env: bool = True
    max_artifact_bytes: int = 8 << 30  # [model]: the most a model's files may expand to when opened
    version_header: str = "X-Kit-Version"  # "" disables the override
    user_header: str = "X-Kit-User"
    poll_interval: float = 0.5
    retry_max: float = 30.0
    batching: bool = True
    max_batch: int = 64
    max_wait_ms: float = 0.0
    max_body_bytes: int = 8 * 1024 * 1024
    rate_limit: float = 0.0  # requests/second per client per worker; 0: off
    rate_burst: int = 0  # 0: max(1, rate_limit)
    api_keys_sha256: tuple[str, ...] = ()
    keys_file: Path | None = None
    trusted_keys: tuple[str, ...] = ()  # [trust] public_keys: versions must be signed by one of these
    jwt: JwtSettings | None = None  # [auth.jwt] enabled = true
    access_log: bool = True
    canary_guard: Any = None  # kit.serving.guard.GuardSettings ([canary_guard]; absent: off)
    capture: Any = None  # kit.serving.recorder.CaptureSettings ([capture]; absent: off)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys_sha256) or self.keys_file is not None or self.jwt is not None

    def with_(self, **changes: Any) -> "ServiceConfig":
        return dataclasses.replace(self, **changes)


def _check(section: str, key: str, value: Any, typ: type, path: Path) -> Any:
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ServiceError(
            f"{path}: [{section}] {key} = {value!r} must be a {typ.__name__}. Fix the value or regenerate "
            "the service with `kit service new ... --force`."
        )
    return value


def load_service_config(service_dir: Path | str, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read ``<service_dir>/service.toml``; apply ``KIT_REGISTRY``, ``KIT_BIND`` and
    ``KIT_API_KEYS_SHA256`` (extra key digests, comma-separated) from ``environ``."""
    service_dir = Path(service_dir).resolve()
    path = service_dir / SERVICE_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ServiceError(f"No {SERVICE_FILE} in {service_dir}. Generate the service with "
                           "`kit service new NAME --model MODEL`.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ServiceError(f"{path} is not valid TOML ({exc}).") from exc
    values: dict[str, Any] = {}
    jwt_table = None
    for section, body in data.items():
        if section in _TABLES and isinstance(body, dict):
            values[_TABLES[section]] = _parse_table(section, body, path)
            continue
        if section not in _SCHEMA or not isinstance(body, dict):
            raise ServiceError(f"{path}: unknown section [{section}]; known: {sorted([*_SCHEMA, *_TABLES])}.")
        if section == "auth" and "jwt" in body:
            body = dict(body)
            jwt_table = body.pop("jwt")
        for key, value in body.items():
            if key not in _SCHEMA[section]:
                raise ServiceError(
                    f"{path}: unknown key {key!r} in [{section}]; known: {sorted(_SCHEMA[section])}."
                )
            fname, typ = _SCHEMA[section][key]
            values[fname] = _check(section, key, value, typ, path)
    for need in ("name", "model", "registry"):
        if not values.get(need):
            where = "[service] name" if need == "name" else f"[model] {'name' if need == 'model' else need}"
            raise ServiceError(f"{path}: {where} is required.")
    environ = {} if environ is None else environ
    if environ.get("KIT_REGISTRY"):
        values["registry"] = environ["KIT_REGISTRY"]
    if environ.get("KIT_BIND"):
        values["bind"] = environ["KIT_BIND"]
    registry = Path(values["registry"]).expanduser()
    values["registry"] = (registry if registry.is_absolute() else service_dir / registry).resolve()
    keys = values.get("api_keys_sha256", [])
    for k in keys:
        if not (isinstance(k, str) and len(k) == 64 and all(c in "0123456789abcdef" for c in k)):
            raise ServiceError(f"{path}: [auth] api_keys_sha256 holds {k!r}, not a lowercase sha256 hex "
                               "digest. Hash keys with `kit service hash-key KEY` (or sha256sum).")
    # KIT_API_KEYS_SHA256 adds digests (comma-separated) from the environment, e.g. a secret store's,
    # and turns auth on if the file had none. It never removes a key.
    for k in (x.strip() for x in environ.get("KIT_API_KEYS_SHA256", "").split(",")):
        if not k:
            continue
        if not (len(k) == 64 and all(c in "0123456789abcdef" for c in k)):
            raise ServiceError(f"KIT_API_KEYS_SHA256 holds {k[:16]!r}…, not a lowercase sha256 hex digest. "
                               "Hash keys with `kit service hash-key KEY` (or sha256sum).")
        keys = [*keys, k]
    values["api_keys_sha256"] = tuple(keys)
    if values.get("keys_file"):
        kf = Path(values["keys_file"]).expanduser()
        values["keys_file"] = kf if kf.is_absolute() else service_dir / kf
    else:
        values.pop("keys_file", None)
    if jwt_table is not None:
        values["jwt"] = _jwt_settings(jwt_table, path, service_dir, environ)
    values["trusted_keys"] = _trusted_keys(values.get("trusted_keys", []), path)
    if values.get("device", "cpu") not in ("cpu", "cuda") and not str(values["device"]).startswith("cuda:"):
        raise ServiceError(f"{path}: [service] device = {values['device']!r}; use \"cpu\", \"cuda\" or \"cuda:N\".")
    if values.get("engine", "asgi") != "asgi":
        raise ServiceError(f"{path}: [service] engine = {values['engine']!r}: the only engine is \"asgi\" (the "
                           "gthread + Flask engine was removed). Set engine = \"asgi\" or regenerate the service "
                           "with `kit service new ... --force`.")
    for key in ("header_timeout", "body_timeout"):
        if key in values and not values[key] > 0:
            raise ServiceError(f"{path}: [service] {key} must be > 0 seconds, got {values[key]}.")
    for key in ("max_batch", "max_body_bytes", "threads"):
        if key in values and values[key] < 1:
            raise ServiceError(f"{path}: {key} must be >= 1, got {values[key]}.")
    return ServiceConfig(service_dir=service_dir, **values)


def _parse_table(section: str, body: dict[str, Any], path: Path) -> Any:
    if section == "canary_guard":
        from kit.serving.guard import parse_guard_settings

        return parse_guard_settings(body, str(path))
    from kit.serving.recorder import parse_capture_settings

    return parse_capture_settings(body, str(path))


def _jwt_settings(table: Any, path: Path, service_dir: Path, environ: Mapping[str, str]) -> JwtSettings | None:
    """Check ``[auth.jwt]`` (no key material is read here: :mod:`kit.serving.security` does that)."""
    where = f"{path}: [auth.jwt]"
    if not isinstance(table, dict):
        raise ServiceError(f"{where} must be a table ([auth.jwt] with enabled = true and its keys).")
    v: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _JWT_SCHEMA:
            raise ServiceError(f"{where}: unknown key {key!r}; known: {sorted(_JWT_SCHEMA)}.")
        if key == "audience" and isinstance(value, str):
            value = [value] if value else []
        v[key] = _check("auth.jwt", key, value, _JWT_SCHEMA[key], path)
    if not v.pop("enabled", False):
        return None
    for key in ("algorithms", "audience", "required_claims"):
        if key in v:
            if not all(isinstance(x, str) and x for x in v[key]):
                raise ServiceError(f"{where} {key} must be a list of non-empty strings, got {v[key]!r}.")
            v[key] = tuple(v[key])
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
    if not 0 <= v.get("leeway", 30.0) <= 300:
        raise ServiceError(f"{where} leeway = {v['leeway']} must be between 0 and 300 seconds.")
    if "client_claim" in v and not v["client_claim"]:
        raise ServiceError(f"{where} client_claim must name a claim (default \"sub\").")
    return JwtSettings(**v)


def _trusted_keys(keys: list[Any], path: Path) -> tuple[str, ...]:
    from kit.errors import SigningKeyError
    from kit.signing import Trust

    try:
        Trust.from_texts([str(k) for k in keys], f"{path}: [trust] public_keys")
    except SigningKeyError as exc:
        raise ServiceError(str(exc)) from exc
    return tuple(str(k) for k in keys)


def service_keyring(cfg: ServiceConfig) -> Any:
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
