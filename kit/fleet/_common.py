"""What the fleet renderers share: the service's settings, address parsing, templates, atomic writes."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from kit._io import atomic_write_text
from kit.errors import ServiceError
from kit.serving.config import ServiceConfig, load_service_config

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")


def service_settings(service_dir: Path | str) -> ServiceConfig:
    """The settings of a generated service folder (``services/NAME``), as its servers read them.

    No environment overrides are applied: the fleet's files describe the service as generated.
    """
    return load_service_config(service_dir, environ={})


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); a clear error otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ServiceError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:8001 or [::1]:8001).")
    return host, int(port)


def _yaml_str(value: Any) -> str:
    """A YAML-safe scalar: JSON strings are valid YAML (quotes and escapes included)."""
    return json.dumps(value)


def template_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kit", "templates/fleet"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["q"] = _yaml_str
    return env


def write_files(files: Mapping[str, str], out_dir: Path | str) -> list[Path]:
    """Write ``{relative name: text}`` under ``out_dir`` atomically; returns the paths written."""
    out = Path(out_dir)
    paths = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        paths.append(path)
    return paths
