"""nginx in front of N instances of one service (``kit fleet nginx``).

Every instance serves from the same registry and follows the same ``aliases.json``, so nginx needs
no knowledge of versions or canaries: any instance answers any request the same way (sticky users
hash to the same version everywhere). What nginx adds is spreading load, keep-alive connections to
the instances, passive health (``max_fails``/``fail_timeout``) and retrying inference on the next
instance when one fails before answering (error, timeout, 502, 503). Inference has no side effects,
so it may be retried although it is a POST (``non_idempotent``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kit.errors import ServiceError
from kit.fleet._common import parse_address, template_env
from kit.serving.config import ServiceConfig


@dataclass(frozen=True)
class NginxOptions:
    """Knobs of the generated nginx configuration (the rest comes from service.toml).

    max_fails / fail_timeout: passive health; after ``max_fails`` failed attempts within
    ``fail_timeout`` seconds an instance is left out for ``fail_timeout`` seconds.
    tries: attempts per request across instances (1 + retries).
    keepalive: idle keep-alive connections to the instances kept per nginx worker.
    state_dir: where a complete nginx.conf puts its pid, logs and temp files (None: the system's).
    run_as: the ``user`` directive of a complete nginx.conf (None: nginx's default, nobody).
    """

    max_fails: int = 1
    fail_timeout: int = 5
    tries: int = 3
    keepalive: int = 32
    connect_timeout: float = 1.0
    state_dir: str | None = None
    run_as: str | None = None


def _check_header(name: str, what: str) -> None:
    # nginx drops client headers with underscores unless told otherwise; Kit's defaults use hyphens.
    if "_" in name:
        raise ServiceError(f"{what} {name!r} holds an underscore, which nginx drops by default. Use hyphens "
                           "in service.toml [routing], or add `underscores_in_headers on;` yourself.")


def render_nginx(cfg: ServiceConfig, upstreams: Sequence[str], listen: str, *, server_block: bool = False,
                 options: NginxOptions | None = None) -> str:
    """The nginx configuration for ``cfg``'s service behind ``listen`` with ``upstreams`` (HOST:PORT each).

    ``server_block=True`` gives only the http-level part (map, upstream, log format, server) to
    ``include`` inside an existing ``http {}``; otherwise a complete nginx.conf.
    """
    opts = options or NginxOptions()
    if not upstreams:
        raise ServiceError("Give at least one instance to proxy to (an upstream HOST:PORT).")
    ups = [parse_address(u, "upstream") for u in upstreams]
    if len(set(ups)) != len(ups):
        raise ServiceError(f"An upstream is listed twice: {', '.join(upstreams)}.")
    lhost, lport = parse_address(listen, "listen address")
    for value, what in ((cfg.version_header, "version header"), (cfg.user_header, "user header")):
        if value:
            _check_header(value, what)
    if opts.tries < 1 or opts.max_fails < 0 or opts.fail_timeout < 1 or opts.keepalive < 1:
        raise ServiceError(f"Invalid nginx options {opts}: tries >= 1, max_fails >= 0, fail_timeout >= 1, "
                           "keepalive >= 1.")
    ident = "kit_" + "".join(c if c.isalnum() else "_" for c in cfg.name)
    ctx = {
        "name": cfg.name, "model": cfg.model, "ident": ident, "upstreams": [f"{h}:{p}" for h, p in ups],
        "listen": f"{lhost}:{lport}", "opts": opts, "timeout": cfg.timeout,
        "max_body_bytes": cfg.max_body_bytes, "version_header": cfg.version_header,
        "user_header": cfg.user_header, "state_dir": opts.state_dir and str(Path(opts.state_dir).resolve()),
    }
    env = template_env()
    block = env.get_template("nginx-server.conf.j2").render(**ctx)
    if server_block:
        return block
    return env.get_template("nginx.conf.j2").render(block=block, **ctx)
