"""Rendering ``services/<name>/`` from templates, and starting a generated service.

``generate(name, model, registry=...)`` writes ``wsgi.py``, ``gunicorn.conf.py``, ``service.toml``,
``README.md`` and ``start.sh``; the same inputs always give the same bytes. ``start_service(dir)``
runs ``python -m gunicorn --config gunicorn.conf.py wsgi:app`` from the folder on a free local port
and waits for ``/readyz``. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from kit._io import atomic_write_text
from kit._proc import free_port, stop_group, wait_http
from kit.errors import ServiceError

log = logging.getLogger(__name__)

FILES = ("wsgi.py", "gunicorn.conf.py", "service.toml", "README.md", "start.sh")
DEFAULTS: dict[str, Any] = {
    "bind": "127.0.0.1:8000", "device": "cpu", "workers": 0, "threads": 4, "torch_threads": 0,
    "timeout": 60, "graceful_timeout": 30, "keepalive": 5, "max_requests": 200000,
    "max_requests_jitter": 20000, "preload": True, "engine": "asgi", "header_timeout": 10.0,
    "body_timeout": 30.0, "check_env": True, "max_artifact_bytes": 8 << 30, "version_header": "X-Kit-Version",
    "user_header": "X-Kit-User", "poll_interval": 0.5, "retry_max": 30.0, "batching": True, "max_batch": 64,
    "max_wait_ms": 0.0, "max_body_bytes": 8 * 1024 * 1024, "rate_limit": 0.0, "rate_burst": 0,
    "api_keys_sha256": (), "keys_file": "", "access_log": True,
    "trusted_keys": (),  # [trust] public_keys ("ed25519:..."): shells pass the project's key (kit.signing)
    # [auth.jwt]; an HS* service with no secret source reads KIT_JWT_SECRET
    "jwt": False, "jwt_algorithms": ("HS256",), "jwt_secret_env": "", "jwt_secret_file": "",
    "jwt_public_key_file": "", "jwt_jwks_file": "", "jwt_issuer": "", "jwt_audience": (), "jwt_leeway": 30.0,
    "jwt_client_claim": "sub", "jwt_required_claims": ("exp",),
}
# [canary_guard] (on for new services) and [capture] (off): kit.serving.guard / kit.serving.recorder
DEFAULTS.update({
    "canary_guard": True, "guard_min_requests": 50, "guard_window_s": 60.0, "guard_max_error_rate_increase": 0.05,
    "guard_max_p95_ratio": 2.0, "guard_min_p95_delta_ms": 20.0, "guard_interval_s": 1.0, "guard_steps": (),
    "guard_hold_s": 300.0,
    "capture": False, "capture_sample_rate": 0.01, "capture_folder": "capture", "capture_max_bytes": 256 << 20,
    "capture_max_file_bytes": 16 << 20, "capture_drop_inputs": (),
})
_JWT_TEXT = ("jwt_secret_env", "jwt_secret_file", "jwt_public_key_file", "jwt_jwks_file", "jwt_issuer",
             "jwt_client_claim")


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("kit", "templates/service"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )


def _toml_str(value: str, what: str) -> str:
    if any(c in value for c in '"\\\n\r\t') or not value.isprintable():
        raise ServiceError(f"{what} {value!r} holds a quote, backslash or control character; choose another.")
    return value


def _jwt_context(ctx: dict[str, Any]) -> None:
    """Check the ``jwt_*`` options for TOML; the service checks their meaning when it loads service.toml."""
    for key in _JWT_TEXT:
        ctx[key] = _toml_str(str(ctx[key]), key)
    for key in ("jwt_algorithms", "jwt_audience", "jwt_required_claims"):
        value = ctx[key]
        ctx[key] = [_toml_str(str(x), key) for x in ([value] if isinstance(value, str) else value)]
    ctx["jwt_leeway"] = float(ctx["jwt_leeway"])
    sources = ("jwt_secret_env", "jwt_secret_file", "jwt_public_key_file", "jwt_jwks_file")
    if ctx["jwt"] and not any(ctx[k] for k in sources) and str(ctx["jwt_algorithms"][0]).startswith("HS"):
        ctx["jwt_secret_env"] = "KIT_JWT_SECRET"


def _trusted_keys(keys: Any) -> list[str]:
    from kit.errors import SigningKeyError
    from kit.signing import Trust

    keys = [keys] if isinstance(keys, str) else list(keys)
    try:
        return [k.text() for k in Trust.from_texts(keys, "trusted_keys").keys]
    except SigningKeyError as exc:
        raise ServiceError(str(exc)) from exc


def render(name: str, model: str, *, registry: str, **options: Any) -> dict[str, str]:
    """The generated files' text (no writing). ``options`` are service.toml settings (see DEFAULTS)."""
    from kit.registry import validate_name

    validate_name(name, "service name")
    validate_name(model)
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ServiceError(f"Unknown service option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}.")
    ctx = {**DEFAULTS, **options, "name": name, "model": model, "registry": _toml_str(registry, "registry path")}
    for key in ("bind", "device", "version_header", "user_header", "keys_file", "engine"):
        ctx[key] = _toml_str(str(ctx[key]), key)
    keys = [str(k).lower() for k in ctx["api_keys_sha256"]]
    for k in keys:
        if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
            raise ServiceError(f"API key hash {k[:16]!r}... is not a sha256 hex digest (64 hex characters).")
    ctx["api_keys_sha256"] = keys
    ctx["trusted_keys"] = _trusted_keys(ctx["trusted_keys"])
    _jwt_context(ctx)
    ctx["guard_steps"] = [float(x) for x in ctx["guard_steps"]]
    ctx["capture_folder"] = _toml_str(str(ctx["capture_folder"]), "capture_folder")
    drop = ctx["capture_drop_inputs"]
    ctx["capture_drop_inputs"] = [_toml_str(str(x), "capture_drop_inputs") for x in ([drop] if isinstance(drop, str) else drop)]
    for key in ("guard_window_s", "guard_max_error_rate_increase", "guard_max_p95_ratio", "guard_min_p95_delta_ms",
                "guard_interval_s", "guard_hold_s", "capture_sample_rate"):
        ctx[key] = float(ctx[key])
    env = _env()
    return {f: env.get_template(f + ".j2").render(**ctx) for f in FILES}


def generate(name: str, model: str, *, registry: Path | str, out_dir: Path | str = Path("services"),
             force: bool = False, check_model: bool = True, **options: Any) -> Path:
    """Render ``<out_dir>/<name>/`` for ``model`` served from ``registry``; returns the folder.

    The registry path is written relative to the service folder when it can be. An existing folder
    is refused unless ``force``; then only the generated files are rewritten (atomically).
    ``check_model`` refuses a model the registry does not have (a typo would never become ready).
    """
    from kit.registry import validate_name

    out = Path(out_dir).resolve() / validate_name(name, "service name")
    registry = Path(registry).resolve()
    if check_model:
        from kit.registry import Registry

        models = Registry(registry).models()
        if model not in models:
            raise ServiceError(
                f"Registry {registry} has no model {model!r} (have: {', '.join(models) or 'none'}). Register "
                "it first, or generate without the model check (check_model=False) to do it ahead of time.",
                remedy="no_check_model", subject=model,
            )
    if out.exists() and not force:
        raise ServiceError(f"{out} already exists. Force it to regenerate its files (force=True).", remedy="force")
    try:
        rel = os.path.relpath(registry, out)
    except ValueError:  # another drive (Windows)
        rel = str(registry)
    files = render(name, model, registry=rel, **options)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        atomic_write_text(out / fname, text)
    os.chmod(out / "start.sh", 0o755)
    log.info("generated service %s for model %s at %s", name, model, out)
    return out


def check_config(service_dir: Path | str, *, python: str | None = None, env: Mapping[str, str] | None = None,
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``gunicorn --check-config`` in the folder (it loads the app: the model must be loadable)."""
    service_dir = Path(service_dir).resolve()
    res = subprocess.run(
        [python or sys.executable, "-m", "gunicorn", "--check-config", "--config", "gunicorn.conf.py", "wsgi:app"],
        cwd=service_dir, env=None if env is None else dict(env), capture_output=True, text=True, timeout=timeout,
    )
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        raise ServiceError(f"`gunicorn --check-config` failed for {service_dir} (exit {res.returncode}):\n" + "\n".join(tail))
    return res


@dataclass
class RunningService:
    """A gunicorn master started by :func:`start_service`. Use as a context manager or call stop()."""

    url: str
    pid: int
    service_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    started_seconds: float = 0.0

    def __enter__(self) -> "RunningService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop: SIGTERM to the master (in-flight requests finish), then SIGKILL to whatever is
        left of its process group after ``timeout`` (workers of a killed master go too)."""
        return stop_group(self.process, timeout=timeout)


def start_service(service_dir: Path | str, *, host: str = "127.0.0.1", port: int | None = None,
                  env: Mapping[str, str] | None = None, timeout: float = 60.0, python: str | None = None,
                  args: Sequence[str] = (), log_path: Path | None = None) -> RunningService:
    """Start the service in ``service_dir`` with gunicorn and wait until ``/readyz`` answers 200.

    ``env`` is the whole environment of the server (default: this process's); ``KIT_BIND`` is set to
    ``host:port`` (a free port when None). Raises :class:`ServiceError` with the log tail when the
    server exits or is not ready within ``timeout`` seconds.
    """
    service_dir = Path(service_dir).resolve()
    if not (service_dir / "gunicorn.conf.py").is_file():
        raise ServiceError(f"{service_dir} is not a generated service (no gunicorn.conf.py). "
                           "Generate one with `kit service new NAME --model MODEL`.")
    port = port or free_port(host)
    full_env = dict(os.environ if env is None else env)
    full_env["KIT_BIND"] = f"{host}:{port}"
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"kit-{service_dir.name}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    t0 = time.monotonic()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", *args, "wsgi:app"],
            cwd=service_dir, env=full_env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
    svc = RunningService(url=f"http://{host}:{port}", pid=proc.pid, service_dir=service_dir,
                         log_path=Path(log_path), process=proc)
    try:
        wait_http(svc.url + "/readyz", timeout=max(0.0, t0 + timeout - time.monotonic()), process=proc,
                  log_path=svc.log_path, what=f"The service in {service_dir}")
    except BaseException:
        svc.stop(timeout=5)
        raise
    svc.started_seconds = time.monotonic() - t0
    return svc
