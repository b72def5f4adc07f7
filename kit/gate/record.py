"""The recording API a validation notebook calls (``kit.gate.check``), in the kernel.

Every call prints one readable line. Under :func:`kit.gate.run_gate` the check is also appended, durably,
to a records file of that run; a person running the notebook by hand in JupyterLab just sees the line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._io import append_line
from kit._types import JSONObject
from kit.errors import GateError
from kit.gate.evidence import Check, _fmt, _text_table, checks_html
from kit.registry.names import is_sha256_hex

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.registry.loaded import LoadedModel
    from kit.registry.records import ModelVersion


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

DEFAULT_CHECK_BUDGET_S = 120.0  # seconds one step of the default checks may take (check_budget_s)
_budget_s = DEFAULT_CHECK_BUDGET_S


class BudgetExceeded(GateError):
    """A step ran past its time budget (raised by :meth:`Deadline.tick`, caught by :func:`step`)."""


@dataclass
class Deadline:
    """The time budget of one step: loops call :meth:`tick` between model calls and stop when it is spent."""

    name: str
    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    stopped: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def tick(self) -> None:
        if self.elapsed() > self.budget_s:
            self.stopped = True
            raise BudgetExceeded(f"{self.name} ran past its time budget of {self.budget_s:g}s")


def set_budget(seconds: object) -> float:
    """Set the time budget of every following :func:`step` (the notebook's ``check_budget_s``)."""
    global _budget_s
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise GateError(f"check_budget_s must be a positive number of seconds, got {seconds!r}.")
    _budget_s = float(seconds)
    return _budget_s


@contextmanager
def step(name: str, budget_s: float | None = None) -> Iterator[Deadline]:
    """One step of a gate, timed against its budget, with its start and end sent to the gate's progress.

    The body calls ``deadline.tick()`` between model calls; past the budget the step stops there and a
    failed check ``time budget: <name>`` names the budget and the setting. A single call longer than the
    budget is not interrupted (the cell timeout, gate_timeout, bounds it); its overrun is reported when it
    returns.
    """
    d = Deadline(name, float(budget_s or _budget_s))
    if _run is not None:
        _append(_run.records, {"kind": "begin", "step": name, "budget_s": d.budget_s})
    print(f"… {name} (time budget {d.budget_s:g}s)", flush=True)
    try:
        yield d
    except BudgetExceeded:
        d.stopped = True
    seconds = round(d.elapsed(), 2)
    if d.stopped or seconds > d.budget_s:
        check(f"time budget: {name}", passed=False, value=seconds, threshold=d.budget_s,
              detail=f"{'stopped' if d.stopped else 'finished'} after {seconds:g}s, over the budget of "
                     f"{d.budget_s:g}s per check; raise check_budget_s (e.g. -p check_budget_s="
                     f"{int(d.budget_s * 4)}) or lower batch_n / latency_repeats")
    if _run is not None:
        _append(_run.records, {"kind": "end", "step": name, "seconds": seconds})


def check(name: str, passed: Any, *, value: Any = None, threshold: Any = None, detail: object = None) -> None:
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


def artifact(model_version_or_sha: LoadedModel | ModelVersion | str, *, backend: str | None = None) -> str:
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
    if not is_sha256_hex(sha):
        raise GateError(f"gate.artifact needs a loaded model, a ModelVersion or a sha256 hex string, got "
                        f"{model_version_or_sha!r}.")
    ref = getattr(mv, "ref", None)
    signed = {"signed_by": getattr(model_version_or_sha, "signed_by", None)} if mv is loaded else {}
    if _run is not None:
        _append(_run.records, {"kind": "artifact", "sha256": sha, "ref": ref, **signed,
                               **({"backend": backend} if backend else {})})
    print(f"artifact {ref + ' ' if ref else ''}sha256 {sha[:12]}" + (f" on backend {backend}" if backend else ""),
          flush=True)
    return sha


def baseline(loaded: LoadedModel) -> str:
    """Record the production version a notebook compares the candidate with (a loaded model).

    run_gate fails the run when it is not the production version the gate resolved, or (with a keyring)
    when it was loaded without checking its signature: load it through :func:`open_registry` as well.
    """
    mv = getattr(loaded, "version", None)
    sha = getattr(mv, "artifact_sha256", None)
    if not is_sha256_hex(sha):
        raise GateError(f"gate.baseline needs a loaded model (what Registry.load returns), got {loaded!r}.")
    if _run is not None:
        _append(_run.records, {"kind": "baseline", "sha256": sha, "ref": mv.ref,  # type: ignore[union-attr]
                               "signed_by": getattr(loaded, "signed_by", None),
                               "backend": getattr(loaded, "backend", None)})
    print(f"compared with production {mv.ref} sha256 {sha[:12]}", flush=True)  # type: ignore[union-attr]
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


def open_registry(root: str | Path = "") -> Registry:
    """The registry a validation notebook loads the gated version from (a :class:`kit.registry.Registry`).

    Under :func:`run_gate` it verifies ``meta.json``'s signature against the gate's own trusted keys (given
    to this kernel by the setup cell), so someone who can write the registry but holds no key cannot put
    other files under the version while it is being judged. By hand: the configured registry and keys
    (kit.toml, ``KIT_*``), at ``root`` when given.
    """
    from kit.registry import Registry

    if _run is not None:
        if not _run.trust:
            return Registry(root, keyring=None)  # the gate has no trusted keys: it checks no signatures
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


def _append(path: Path, rec: JSONObject) -> None:
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



def _as_bool(name: object, passed: Any) -> bool:
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

