"""``service.toml``: the one declaration of its settings, the one reader, the one writer.

:data:`SETTINGS` is a table of every setting (section, key, option name, type, default, comment, rule).
From it come: the generated ``service.toml`` (:func:`render_toml`: sections, values, comments), the options
and defaults :mod:`kit.servicegen` takes (:data:`DEFAULTS`), the defaults of
:class:`kit.serving.config.ServiceConfig`, ``JwtSettings``, ``GuardSettings`` and ``CaptureSettings``, and
the checks every reader runs (:func:`check_section`: unknown sections and keys refused, types, simple
ranges). :func:`read_service_toml` is the one place a ``service.toml`` is parsed: the serving config,
pack, deploy and fleet all read through it. Checks that span several keys (``[auth.jwt]`` sources, API key
digests, trusted keys) live with the code that uses them. No torch, no third-party imports.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit import backends
from kit._types import JSONObject
from kit.errors import KitError, ServiceError

log = logging.getLogger(__name__)

SERVICE_FILE = "service.toml"
REQUIRED = object()  # the default of [service] name, [model] name and [model] registry: generate() passes them


@dataclass(frozen=True)
class Setting:
    """One key of service.toml. ``option`` is its name as a :func:`kit.servicegen.generate` option, and the
    :class:`~kit.serving.config.ServiceConfig` field of a flat section's key (the tables ``[auth.jwt]``,
    ``[canary_guard]`` and ``[capture]`` become settings objects whose fields are the keys)."""

    section: str
    key: str
    option: str
    typ: type
    default: object  # REQUIRED, or a value of ``typ`` (a tuple for a list)
    comment: str = ""
    rule: tuple[str, Callable[[Any], bool]] | None = None  # (what it must be, test)
    items: type = str  # element type of a list
    generated: bool = True  # False: read when present, never written by generate()
    lone_str: bool = False  # a list that may be written as one string ("" for none)


def _s(section: str, key: str, typ: type, default: object, comment: str = "", *, option: str = "",
       **kw: Any) -> Setting:
    return Setting(section, key, option or key, typ, default, comment, **kw)


_POS = ("> 0", lambda v: v > 0)
_ONE = (">= 1", lambda v: v >= 1)
_NONNEG = (">= 0", lambda v: v >= 0)

SETTINGS: tuple[Setting, ...] = (
    _s("service", "name", str, REQUIRED),
    _s("service", "bind", str, "127.0.0.1:8000"),
    _s("service", "device", str, "cpu", '"cpu", "cuda" or "cuda:N" (the master never touches CUDA)',
       rule=('"cpu", "cuda" or "cuda:N"', lambda v: v in ("cpu", "cuda") or v.startswith("cuda:"))),
    _s("service", "workers", int, 0, "0: min(cores, 4)", rule=_NONNEG),
    _s("service", "torch_threads", int, 0, "0: max(1, cores // workers)", rule=_NONNEG),
    _s("service", "timeout", int, 60, "seconds; above the model load time (the master kills a silent worker)"),
    _s("service", "graceful_timeout", int, 30, "seconds in-flight requests get on stop"),
    _s("service", "keepalive", int, 5),
    _s("service", "max_requests", int, 200_000, "a worker restarts after this many requests (plus jitter)"),
    _s("service", "max_requests_jitter", int, 20_000),
    _s("service", "preload", bool, True, "master imports torch (never CUDA) so workers start fast"),
    _s("service", "header_timeout", float, 10.0, "seconds for a request head to arrive (else the connection closes)",
       rule=_POS),
    _s("service", "body_timeout", float, 30.0, "seconds for a request body to arrive after its head", rule=_POS),
    _s("model", "name", str, REQUIRED, option="model"),
    _s("model", "registry", str, REQUIRED, "relative to this folder, or absolute"),
    _s("model", "check_env", bool, True, "refuse versions captured in an incompatible environment"),
    _s("model", "backend", str, backends.DEFAULT,
       " or ".join(f'"{b.name}" ({b.artifact})' for b in backends.BACKENDS.values()),
       rule=(" or ".join(f'"{n}"' for n in backends.names()), lambda v: v in backends.BACKENDS)),
    _s("model", "max_artifact_bytes", int, 8 << 30, "the most a version's files may expand to when opened (zip bombs)",
       rule=_ONE),
    _s("model", "max_tensor_bytes", int, 0, "the most one tensor a program makes from sizes may hold; 0: max(256 MiB, "
       "16x the weights)", rule=_NONNEG),
    _s("routing", "version_header", str, "X-Kit-Version", 'explicit version override ("" disables it)'),
    _s("routing", "user_header", str, "X-Kit-User", "sticky canary routing key"),
    _s("reload", "poll_interval", float, 0.5, "seconds between stats of aliases.json", rule=_POS),
    _s("reload", "retry_max", float, 30.0, "longest backoff after a failed reload", rule=_POS),
    _s("batching", "enabled", bool, True, option="batching"),
    _s("batching", "max_batch", int, 64, "the most requests one forward pass takes", rule=_ONE),
    _s("batching", "max_wait_ms", float, 0.0, "0: never wait; batch what arrives during a forward pass", rule=_NONNEG),
    _s("limits", "max_body_bytes", int, 8 * 1024 * 1024, rule=_ONE),
    _s("limits", "rate_limit", float, 0.0, "requests/s per client (API key or address) per worker; 0: off",
       rule=_NONNEG),
    _s("limits", "rate_burst", int, 0, "0: max(1, rate_limit)", rule=_NONNEG),
    _s("auth", "api_keys_sha256", list, (), "sha256 hex digests of the API keys allowed to infer (empty: no auth)"),
    _s("auth", "keys_file", str, "", "optional file of more digests, one per line; re-read on change"),
    _s("auth.jwt", "enabled", bool, False, option="jwt"),
    _s("auth.jwt", "algorithms", list, ("HS256",), option="jwt_algorithms"),
    _s("auth.jwt", "secret_env", str, "", "HS*: the variable holding the secret in the service's environment",
       option="jwt_secret_env"),
    _s("auth.jwt", "secret_file", str, "", "HS*: or a file holding it", option="jwt_secret_file"),
    _s("auth.jwt", "public_key_file", str, "", "RS*/PS*/ES*/EdDSA: a PEM public key",
       option="jwt_public_key_file"),
    _s("auth.jwt", "jwks_file", str, "", 'or a JWKS file (keys chosen by "kid"); key files are re-read on change',
       option="jwt_jwks_file"),
    _s("auth.jwt", "issuer", str, "", 'required "iss" ("": not checked)', option="jwt_issuer"),
    _s("auth.jwt", "audience", list, (), '"aud" must name one of these (empty: tokens that carry an aud are '
       "refused)", option="jwt_audience", lone_str=True),
    _s("auth.jwt", "leeway", float, 30.0, "seconds of clock skew allowed on exp, nbf and iat", option="jwt_leeway",
       rule=("between 0 and 300 seconds", lambda v: 0 <= v <= 300)),
    _s("auth.jwt", "client_claim", str, "sub", "the client for rate limits and sticky canary routing",
       option="jwt_client_claim", rule=('a claim name (default "sub")', bool)),
    _s("auth.jwt", "required_claims", list, ("exp",), option="jwt_required_claims"),
    _s("logging", "access_log", bool, True, "one JSON line per request on stderr"),
    _s("canary_guard", "enabled", bool, True, "absent section: off (services generated before the guard)",
       option="canary_guard"),
    _s("canary_guard", "min_requests", int, 50, "per side, inside the window", option="guard_min_requests", rule=_ONE),
    _s("canary_guard", "window_s", float, 60.0, "seconds of traffic compared", option="guard_window_s", rule=_POS),
    _s("canary_guard", "max_error_rate_increase", float, 0.05, "canary 5xx rate minus production's (0.05: 5 points)",
       option="guard_max_error_rate_increase"),
    _s("canary_guard", "max_p95_ratio", float, 2.0, "canary p95 latency over production's ...",
       option="guard_max_p95_ratio", rule=(">= 1", lambda v: v >= 1)),
    _s("canary_guard", "min_p95_delta_ms", float, 20.0, "... and at least this many ms above it",
       option="guard_min_p95_delta_ms"),
    _s("canary_guard", "interval_s", float, 1.0, "how often each worker shares its counts and judges",
       option="guard_interval_s", rule=_POS),
    _s("canary_guard", "steps", list, (), "progressive promotion, e.g. [5, 25, 50, 100] (percent; 100 promotes, "
       "which needs a passing gate)", option="guard_steps", items=float),
    _s("canary_guard", "hold_s", float, 300.0, "seconds a step must stay healthy before the next",
       option="guard_hold_s"),
    _s("capture", "enabled", bool, False, option="capture"),
    _s("capture", "sample_rate", float, 0.01, "share of answered requests recorded (1.0: all)",
       option="capture_sample_rate", rule=("between 0 and 1", lambda v: 0.0 <= v <= 1.0)),
    _s("capture", "folder", str, "capture", "relative to this folder, or absolute", option="capture_folder"),
    _s("capture", "max_bytes", int, 256 << 20, "per worker, rotated files included", option="capture_max_bytes"),
    _s("capture", "max_file_bytes", int, 16 << 20, "a file this large is closed and a new one begun",
       option="capture_max_file_bytes", rule=(">= 1024", lambda v: v >= 1024)),
    _s("capture", "drop_inputs", list, (), "inputs never written (privacy)", option="capture_drop_inputs"),
    _s("capture", "queue_size", int, 1024, "records waiting for the writer; beyond it records are dropped",
       option="capture_queue_size", rule=_ONE, generated=False),
    _s("trust", "public_keys", list, (), option="trusted_keys"),
)

# Keys of the removed gthread + Flask engine. Older service.toml files (and generate() callers) may still
# hold them: accepted, ignored, logged as deprecated. (section, key) -> (why, the values still accepted or None).
RETIRED: dict[tuple[str, str], tuple[str, tuple[str, ...] | None]] = {
    ("service", "threads"): ("gthread request threads per worker; uvicorn workers never read it", None),
    ("service", "engine"): ('the ASGI engine is the only one (the gthread + Flask engine was removed)', ("asgi",)),
}


def retired(section: str, key: str, value: object, where: str, error: type[KitError] = ServiceError) -> bool:
    """True (after one deprecation line in the log) when ``[section] key`` is a retired key to ignore;
    :class:`ServiceError` when its value asks for what no longer exists (``engine = "flask"``)."""
    entry = RETIRED.get((section, key))
    if entry is None:
        return False
    why, accepted = entry
    if accepted is not None and value not in accepted:
        allowed = " or ".join(f'"{a}"' for a in accepted)
        raise error(f"{where}: [{section}] {key} = {value!r} must be {allowed}: {why}. "
                    f"Remove the key.")
    log.warning("%s: [%s] %s is no longer read (%s); remove it.", where, section, key, why)
    return True


# Comment lines under a section's header in the generated file.
NOTES: dict[str, tuple[str, ...]] = {
    "auth.jwt": (
        "Bearer JWTs, alongside any API keys (a request passes with either). HS256/HS384/HS512 check a shared",
        "secret (secret_env or secret_file, at least 32 bytes); RS*/PS*/ES*/EdDSA a PEM public key or a JWKS file.",
    ),
    "canary_guard": (
        "Ends a canary that is worse than production (kit.serving.guard; docs/guard.md): once both sides have",
        "min_requests inside the window, counted over every worker of every instance.",
    ),
    "capture": ("A sample of answered requests (inputs, served version, outputs) as JSONL, for `kit replay` "
                "(docs/guard.md).",),
    "trust": (
        "Versions must be signed (meta.json.sig) by one of these keys, or the service refuses to load them",
        "(empty: no signature check, sha256 only). `kit keys show` prints a key; see docs/security.md.",
    ),
}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))
BY_SECTION: dict[str, dict[str, Setting]] = {sec: {s.key: s for s in SETTINGS if s.section == sec} for sec in SECTIONS}
BY_OPTION: dict[str, Setting] = {s.option: s for s in SETTINGS}
# generate()'s options and their defaults (name, model and registry are its arguments)
DEFAULTS: dict[str, object] = {s.option: s.default for s in SETTINGS if s.generated and s.default is not REQUIRED}


def default(section: str, key: str) -> Any:
    """The declared default of ``[section] key`` (what the settings objects default to as well)."""
    return BY_SECTION[section][key].default


def _type_name(s: Setting) -> str:
    if s.typ is list:
        return "list of non-empty strings" if s.items is str else "list of numbers"
    return s.typ.__name__


def check_value(s: Setting, value: object, where: str, error: type[KitError] = ServiceError) -> object:
    """``value`` checked against ``s`` (type, then rule); ints become floats where a float is declared,
    lists become tuples."""
    def bad(what: str) -> KitError:
        return error(f"{where}: [{s.section}] {s.key} = {value!r} must be {what}. Fix the value or regenerate "
                     "the service with `kit service new ... --force`.")

    if s.typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if s.lone_str and isinstance(value, str):
        value = [value] if value else []
    if s.typ is list and isinstance(value, tuple):  # checked once already (a settings parser's input)
        value = list(value)
    if not isinstance(value, s.typ) or (s.typ is int and isinstance(value, bool)):
        raise bad(f"a {_type_name(s)}")
    if isinstance(value, list):
        items = []
        for x in value:
            if s.items is float and isinstance(x, int) and not isinstance(x, bool):
                x = float(x)
            if not isinstance(x, s.items) or isinstance(x, bool) or x == "":
                raise bad(f"a {_type_name(s)}")
            items.append(x)
        value = tuple(items)
    if s.rule is not None and not s.rule[1](value):
        raise bad(s.rule[0])
    return value


def check_section(section: str, body: Mapping[str, object], where: str,
                  error: type[KitError] = ServiceError) -> JSONObject:
    """A table's keys checked against the declaration: ``{key: value}`` (unknown keys refused)."""
    known = BY_SECTION[section]
    out: JSONObject = {}
    for key, value in body.items():
        s = known.get(key)
        if s is None and retired(section, key, value, where, error):
            continue
        if s is None:
            raise error(f"{where}: unknown key {key!r} in [{section}]; known: {sorted(known)}.")
        out[key] = check_value(s, value, where, error)
    return out


def check_document(data: Mapping[str, object], where: str, error: type[KitError] = ServiceError) -> dict[str, JSONObject]:
    """A whole parsed service.toml checked: ``{section: {key: value}}`` (``[auth.jwt]`` as its own section).
    Unknown sections and keys are refused, so a typo never silently falls back to a default."""
    out: dict[str, JSONObject] = {}
    for section, body in data.items():
        if section not in BY_SECTION or section == "auth.jwt" or not isinstance(body, dict):
            raise error(f"{where}: unknown section [{section}]; known: {sorted(SECTIONS)}.")
        body = dict(body)
        if section == "auth" and "jwt" in body:
            jwt = body.pop("jwt")
            if not isinstance(jwt, dict):
                raise error(f"{where}: [auth.jwt] must be a table ([auth.jwt] with enabled = true and its keys).")
            out["auth.jwt"] = check_section("auth.jwt", jwt, where, error)
        out[section] = check_section(section, body, where, error)
    for section, key in (("service", "name"), ("model", "name"), ("model", "registry")):
        if not out.get(section, {}).get(key):
            raise error(f"{where}: [{section}] {key} is required.")
    return out


def read_service_toml(service_dir: Path | str, error: type[KitError] = ServiceError) -> dict[str, JSONObject]:
    """Parse and check ``<service_dir>/service.toml``: ``{section: {key: value}}`` (see :func:`check_document`).

    ``error`` is the class raised (a pack step raises :class:`~kit.errors.PackError`, the service
    :class:`~kit.errors.ServiceError`)."""
    service_dir = Path(service_dir)
    path = service_dir / SERVICE_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise error(f"No {SERVICE_FILE} in {service_dir}, so it is not a generated service. Generate one with "
                    "`kit service new NAME --model MODEL`.") from exc
    except OSError as exc:
        raise error(f"{path} is unreadable ({exc}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML ({exc}). Fix it or regenerate the service with "
                    "`kit service new ... --force`.") from exc
    return check_document(data, str(path), error)


# --------------------------------------------------------------------------- writing


def toml_str(value: str, what: str) -> str:
    """``value`` as a TOML basic string; refuses what would need escaping (names, paths and headers never do)."""
    if any(c in value for c in '"\\\n\r\t') or not value.isprintable():
        raise ServiceError(f"{what} {value!r} holds a quote, backslash or control character; choose another.")
    return f'"{value}"'


def coerce_option(s: Setting, value: Any) -> object:
    """A :func:`kit.servicegen.generate` option made the declared type (a lone string for a list is a
    one-item list; a path is its string); :class:`ServiceError` when it cannot be."""
    where = f"service option {s.option}"
    if s.typ is list:
        value = [value] if isinstance(value, (str, int, float)) else list(value)
        value = [str(x) if s.items is str else x for x in value]
    elif s.typ is str:
        value = str(value)
    return check_value(s, value, where, ServiceError)


def _toml_value(s: Setting, value: Any) -> str:
    if s.typ is bool:
        return "true" if value else "false"
    if s.typ in (int, float):
        return repr(value)
    if s.typ is str:
        return toml_str(value, s.option)
    if s.items is str:
        return "[" + ", ".join(toml_str(x, s.option) for x in value) + "]"
    return "[" + ", ".join(repr(x) for x in value) + "]"


_COMMENT_COLUMN = 34


def render_toml(values: Mapping[str, object], header: Iterable[str] = ()) -> str:
    """The text of a service.toml holding ``values`` (``{option: value}``, every generated option present,
    already coerced): sections in declaration order, each key with its comment. Same values, same bytes."""
    lines = [f"# {h}" for h in header]
    for section in SECTIONS:
        rows = [s for s in BY_SECTION[section].values() if s.generated]
        lines += ["", f"[{section}]", *(f"# {n}" for n in NOTES.get(section, ()))]
        for s in rows:
            text = f"{s.key} = {_toml_value(s, values[s.option])}"
            if s.comment:
                text = f"{text.ljust(_COMMENT_COLUMN - 2)}  # {s.comment}"
            lines.append(text)
    return "\n".join(lines).lstrip("\n") + "\n"
