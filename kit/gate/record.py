"""The recording API a validation notebook calls (``kit.gate.check``), in the kernel.

Every call prints one readable line. Under :func:`kit.gate.run_gate` the check is also appended, durably,
to a records file of that run; a person running the notebook by hand in JupyterLab just sees the line.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit._io import append_line
from kit.errors import GateError
from kit.gate.evidence import Check, _fmt, _text_table, checks_html


def kit_location() -> str:
    """The kit package this process imports (kernel and caller must agree)."""
    return str(Path(__file__).resolve().parent.parent)


@dataclass
class _Run:
    records: Path
    notebook: str
    run_id: str
    trust: tuple[str, ...] = ()  # the gate's trusted public keys (ed25519:...): what open_registry verifies with


_run: _Run | None = None
_session: list[Check] = []


def check(name: str, passed: Any, *, value: Any = None, threshold: Any = None, detail: Any = None) -> None:
    """Record one check and print it as one line (``✓ PASS  accuracy = 0.97 (threshold 0.9)``).

    ``value`` and ``threshold`` are the evidence (numbers, strings, or anything with ``.item()``);
    ``detail`` is a short free-text explanation. Under :func:`run_gate` the check is written to the
    run's records at once, so it survives a later crash of the kernel.
    """
    if not isinstance(name, str) or not name.strip():
        raise GateError(f"gate.check needs a non-empty name (a str), got {name!r}.")
    c = Check(name=name.strip(), passed=_as_bool(name, passed), value=_jsonable(value),
              threshold=_jsonable(threshold), detail=None if detail is None else str(detail),
              notebook=_run.notebook if _run else None)
    _session.append(c)
    if _run is not None:
        _append(_run.records, {"kind": "check", **c.to_dict()})
    print(("✓ " if c.passed else "✗ ") + c.line(), flush=True)


def artifact(model_version_or_sha: Any, *, backend: str | None = None) -> str:
    """Record which artifact this notebook loaded (a loaded model, a ``ModelVersion`` or its sha256), and
    with which backend (``model.backend``: ``"torch"`` or ``"onnxruntime"``).

    run_gate fails the run when a notebook loaded anything but the artifact being gated, or loaded it
    with another backend than the one gated. A loaded model (what ``Registry.load`` returns) also records
    the key its signature verified against: a gate whose registry checks signatures fails a notebook that
    loaded the model without checking (load it through :func:`open_registry`).
    """
    loaded = getattr(model_version_or_sha, "version", None)
    mv = loaded if hasattr(loaded, "artifact_sha256") else model_version_or_sha
    sha = getattr(mv, "artifact_sha256", mv)
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise GateError(f"gate.artifact needs a loaded model, a ModelVersion or a sha256 hex string, got "
                        f"{model_version_or_sha!r}.")
    ref = getattr(mv, "ref", None)
    signed = {"signed_by": model_version_or_sha.signed_by} if mv is loaded else {}
    if _run is not None:
        _append(_run.records, {"kind": "artifact", "sha256": sha, "ref": ref, **signed,
                               **({"backend": backend} if backend else {})})
    print(f"artifact {ref + ' ' if ref else ''}sha256 {sha[:12]}" + (f" on backend {backend}" if backend else ""),
          flush=True)
    return sha


def checks() -> tuple[Check, ...]:
    """The checks recorded so far in this kernel (this run, or this hand-run session)."""
    return tuple(_session)


def summary() -> CheckTable:
    """A table of this kernel's checks; displays as HTML in a notebook and as text elsewhere."""
    return CheckTable(tuple(_session))


def running_under_gate() -> bool:
    """True when this kernel was started by :func:`run_gate` (checks go to the run's records)."""
    return _run is not None


def open_registry(root: str | Path = "") -> Any:
    """The registry a validation notebook loads the gated version from (a :class:`kit.registry.Registry`).

    Under :func:`run_gate` it verifies ``meta.json``'s signature against the gate's own trusted keys (given
    to this kernel by the setup cell), so someone who can write the registry but holds no key cannot put
    other files under the version while it is being judged. By hand: the configured registry and keys
    (kit.toml, ``KIT_*``), at ``root`` when given.
    """
    from kit.registry import Registry

    if _run is not None:
        if not _run.trust:
            return Registry(root)  # the gate's registry checks no signatures (it has no keyring)
        from kit.signing import Keyring, Trust

        return Registry(root, keyring=Keyring.verify_only(Trust.from_texts(_run.trust, "the gate's trusted keys")))
    from kit.config import load_config

    return Registry.from_config(load_config(registry=root or None))


def _begin_run(records: str, notebook: str, run_id: str, trust: Sequence[str] = ()) -> None:
    """Called by the setup cell run_gate puts first in the notebook; not for notebook authors."""
    global _run
    _run = _Run(Path(records), notebook, run_id, tuple(trust))
    _session.clear()
    _append(_run.records, {"kind": "kernel", "executable": sys.executable, "prefix": sys.prefix,
                           "pid": os.getpid(), "python": sys.version.split()[0], "run_id": run_id,
                           "kit": kit_location()})


def _append(path: Path, rec: dict[str, Any]) -> None:
    append_line(path, json.dumps(rec, sort_keys=True, allow_nan=False))


class CheckTable:
    """Checks rendered for people: an HTML table in notebooks and reports, aligned text elsewhere."""

    def __init__(self, checks: Sequence[Check]):
        self.checks = tuple(checks)

    def __repr__(self) -> str:
        if not self.checks:
            return "No checks recorded. Record one with kit.gate.check(name, passed=..., value=..., threshold=...)."
        rows = [("PASS" if c.passed else "FAIL", c.name, _fmt(c.value), _fmt(c.threshold), c.detail or "")
                for c in self.checks]
        return _text_table(rows, ("RESULT", "CHECK", "VALUE", "THRESHOLD", "DETAIL"))

    def _repr_html_(self) -> str:
        return checks_html(self.checks)



def _as_bool(name: Any, passed: Any) -> bool:
    if hasattr(passed, "item") and callable(passed.item):  # numpy.bool_, 0-d tensors
        try:
            passed = passed.item()
        except (ValueError, RuntimeError) as exc:
            raise GateError(f"check {name!r}: passed must be one True/False, got an array/tensor "
                            f"with more than one element. Reduce it first (e.g. .all()).") from exc
    if isinstance(passed, bool):
        return passed
    raise GateError(f"check {name!r}: passed must be True or False, got {passed!r} "
                    f"({type(passed).__name__}). Write the condition, e.g. passed=acc >= min_accuracy.")


def _jsonable(v: Any) -> Any:
    """Numbers stay numbers (non-finite ones become strings: strict JSON has no NaN), else str."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalars, 0-d tensors
        try:
            v = v.item()
        except (ValueError, RuntimeError, TypeError):
            return str(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)) and len(v) <= 16:
        return [_jsonable(x) for x in v]
    return str(v)

