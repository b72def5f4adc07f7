"""Configuration, resolved once at the edge and passed down.

Precedence: defaults < ``kit.toml`` or ``[tool.kit]`` in ``pyproject.toml`` (nearest, walking up from
the working directory) < ``KIT_*`` environment variables < explicit arguments. Library code never reads
``os.environ``; the shells (cli, magics, widgets, generated services) call :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._types import JSONObject
from kit.errors import ConfigError

if TYPE_CHECKING:
    from kit.signing import Keyring


@dataclass(frozen=True)
class KitConfig:
    """Resolved settings. Paths are absolute; ``registry`` is a folder or an ``s3://bucket/prefix`` URL."""

    registry: Path | str
    project_root: Path
    require_gate: bool = True
    user: str = "unknown"
    gate_timeout: float = 600.0
    # Signing (kit.signing): the key folder (default ~/.config/kit/keys, or $XDG_CONFIG_HOME/kit/keys),
    # or one private key file that signs instead; more trusted public keys ("ed25519:...").
    keys_dir: Path | None = None
    signing_key: Path | None = None
    trusted_keys: tuple[str, ...] = ()
    # Where generated services go, and the validation notebooks a gate runs when none is named
    # (empty: kit's own model-agnostic default). `kit init` writes both into kit.toml.
    services: Path | None = None
    validation: tuple[Path, ...] = ()
    # kit.toml's [gate] table: parameters every gate passes to its notebooks (e.g. an absolute latency budget,
    # max_p95_ms_batch1 = 50); `-p` / `--param` override them one by one.
    gate: JSONObject = field(default_factory=dict)

    def keyring(self) -> Keyring:
        """The :class:`kit.signing.Keyring` a registry of this project signs with and verifies against."""
        from kit.signing import Keyring

        for what, path in (("keys_dir", self.keys_dir), ("signing_key", self.signing_key)):
            if path is not None and isinstance(self.registry, Path) and (path == self.registry
                                                                        or self.registry in path.parents):
                raise ConfigError(f"{what} {path} is inside the registry {self.registry}, where anyone who can "
                                  "write the registry could read or replace it. Keep keys elsewhere (the default "
                                  "is ~/.config/kit/keys).")
        return Keyring(self.keys_dir, signing_key=self.signing_key, trusted=self.trusted_keys)

    def with_(self, **changes: Any) -> KitConfig:
        return dataclasses.replace(self, **changes)


_ENV_KEYS = {
    "KIT_REGISTRY": "registry",
    "KIT_PROJECT_ROOT": "project_root",
    "KIT_REQUIRE_GATE": "require_gate",
    "KIT_USER": "user",
    "KIT_GATE_TIMEOUT": "gate_timeout",
    "KIT_KEYS_DIR": "keys_dir",
    "KIT_SIGNING_KEY": "signing_key",
    "KIT_TRUSTED_KEYS": "trusted_keys",
}


def _find_file_config(start: Path) -> tuple[Path, JSONObject]:
    for d in (start, *start.parents):
        kt = d / "kit.toml"
        if kt.is_file():
            return d, _read_toml(kt)
        pp = d / "pyproject.toml"
        if pp.is_file():
            data = _read_toml(pp)
            if "kit" in data.get("tool", {}):
                return d, dict(data["tool"]["kit"])
    return start, {}


def _read_toml(path: Path) -> JSONObject:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}). Fix the file or remove it.") from exc


def _coerce(key: str, value: Any) -> object:
    if key == "registry" and isinstance(value, str) and "://" in value:
        from kit.registry.s3 import parse_s3_url  # refuses what is not s3://bucket/prefix, naming the form

        bucket, prefix = parse_s3_url(value)
        return f"s3://{bucket}/{prefix}".rstrip("/")
    if key in ("registry", "project_root"):
        return Path(value)
    if key in ("keys_dir", "signing_key", "services"):
        return Path(str(value)).expanduser()
    if key == "validation":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
            raise ConfigError(f"validation must be a list of notebook paths, got {value!r}.")
        return tuple(Path(p).expanduser() for p in items)
    if key == "gate":
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
            raise ConfigError(f"[gate] must be a table of notebook parameters (name = value), got {value!r}.")
        return dict(value)
    if key == "trusted_keys":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(k, str) for k in items):
            raise ConfigError(f"trusted_keys must be a list of \"ed25519:...\" strings, got {value!r}.")
        return tuple(k.strip() for k in items if k.strip())
    if key == "require_gate":
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"require_gate must be true or false, got {value!r}.")
    if key == "gate_timeout":
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(f"gate_timeout must be a number of seconds, got {value!r}.") from exc
    return value


def _default_user() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # getpass can fail in containers without a passwd entry
        return "unknown"


def load_config(
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **explicit: object,
) -> KitConfig:
    """Resolve the configuration (see module docstring). ``explicit`` values of None are ignored."""
    cwd = Path(cwd or os.getcwd()).resolve()
    environ = os.environ if environ is None else environ
    root, file_cfg = _find_file_config(cwd)
    fields = {f.name for f in dataclasses.fields(KitConfig)}
    unknown = set(file_cfg) - fields
    if unknown:
        raise ConfigError(
            f"Unknown Kit setting(s) {sorted(unknown)} in the config near {root}; known: {sorted(fields)}."
        )
    values: dict[str, Any] = {"registry": "registry", "project_root": root, "user": _default_user(),
                              "keys_dir": _default_keys_dir(environ)}
    values.update(file_cfg)
    for env_key, key in _ENV_KEYS.items():
        if environ.get(env_key):
            values[key] = environ[env_key]
    values.update({k: v for k, v in explicit.items() if v is not None})
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"Unknown Kit setting(s) {sorted(unknown)}; known: {sorted(fields)}.")
    values = {k: _coerce(k, v) for k, v in values.items()}
    project_root = Path(values["project_root"]).resolve()
    values["project_root"] = project_root
    if not isinstance(values["registry"], str):  # an s3:// URL stays as it is
        registry = Path(values["registry"])
        values["registry"] = (registry if registry.is_absolute() else project_root / registry).resolve()
    for key in ("keys_dir", "signing_key"):  # relative paths in kit.toml are relative to the project
        if values.get(key) is not None and not values[key].is_absolute():
            values[key] = (project_root / values[key]).resolve()
    values["services"] = (project_root / (values.get("services") or "services")).resolve()
    values["validation"] = tuple((project_root / p).resolve() for p in values.get("validation", ()))
    return KitConfig(**values)


def _default_keys_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "kit" / "keys"
