"""What a user may write: model names, version numbers, ``name@ref`` references, canary weights and
sha256 digests.

Every name reaches the filesystem (``<root>/<name>/versions/<n>``), a URL or a header, so each is checked
here, once, with ASCII-only patterns matched whole.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeGuard

from kit.errors import InvalidNameError

if TYPE_CHECKING:
    from _typeshed import ConvertibleToFloat

ALIASES = ("production", "canary")
REFS = ("production", "canary", "latest")
# Matched with fullmatch (``$`` would accept a trailing newline); ASCII classes only.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,9}")  # ASCII digits: str.isdigit() takes "²" and "١"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def validate_name(name: str, what: str = "model name") -> str:
    """A model (or service: ``what``) name: ASCII letters, digits, '.', '_', '-'; no separators, no '..'."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"Invalid {what} {name!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', no '..', no spaces or control characters)."
        )
    return name


def is_version_text(text: str) -> bool:
    """True for 1-9 ASCII digits (what a version number may be written as in a ref, path or header)."""
    return isinstance(text, str) and _VERSION_RE.fullmatch(text) is not None


def is_sha256_hex(value: object) -> TypeGuard[str]:
    """The one rule for a sha256 digest read from a file, record or setting: 64 lowercase hex digits, whole."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def validate_version(version: object) -> int:
    if isinstance(version, bool):
        raise InvalidNameError(f"Invalid version {version!r}: versions are positive integers.")
    if isinstance(version, int):
        v = version
    elif isinstance(version, str) and is_version_text(version):
        v = int(version)
    else:
        raise InvalidNameError(f"Invalid version {version!r}: versions are positive integers (1, 2, ...).")
    if v < 1:
        raise InvalidNameError(f"Invalid version {version!r}: versions start at 1.")
    return v


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"digits@3"`` -> ("digits", "3"); ``"digits@production"``; ``"digits"`` -> ("digits", None)."""
    name, _, sel = ref.partition("@")
    validate_name(name)
    if sel == "":
        return name, None
    if sel not in REFS:
        validate_version(sel)
    return name, sel


def parse_weight(text: str | float) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. A bare number above 1 is refused (write ``10%``); 0 is allowed (stop)."""
    s = str(text).strip()
    try:
        w = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError as exc:
        raise InvalidNameError(f"Canary weight {text!r} is not a number; write it as 10% or 0.1.") from exc
    if not s.endswith("%") and w > 1.0:
        raise InvalidNameError(f"Canary weight {text!r} is above 1; write a percentage as {s}% or a fraction as 0.1.")
    return check_weight(w, allow_zero=True, shown=text)


def check_weight(weight: ConvertibleToFloat, *, allow_zero: bool = False, shown: object = None) -> float:
    """The one rule for a canary weight given as a number: a finite real in (0, 1], or [0, 1] with
    ``allow_zero`` (0 is no canary). Bools, NaN and infinities are refused. ``shown`` is what the user wrote."""
    shown = weight if shown is None else shown
    try:
        if isinstance(weight, bool):
            raise TypeError("a bool")
        w = float(weight)
    except (TypeError, ValueError) as exc:
        raise InvalidNameError(f"Canary weight must be a number from 0 to 1 (0.1 is 10%), got {shown!r}.") from exc
    if not (0.0 <= w <= 1.0 if allow_zero else 0.0 < w <= 1.0):  # NaN fails both
        span = "from 0% to 100%" if allow_zero else "in (0%, 100%] (0 is no canary: end it instead)"
        raise InvalidNameError(f"Canary weight must be {span}; 0.1 is 10%, got {shown!r}.")
    return w
