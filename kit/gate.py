"""Validation gates: notebooks that must pass against an exact artifact before it serves traffic.

Two halves live here.

*Inside a notebook* (the recording API)::

    from kit import gate
    gate.check("accuracy", passed=acc >= min_accuracy, value=acc, threshold=min_accuracy)

Every call prints one readable line. Under :func:`run_gate` the check is also appended, durably, to
a records file of that run; a person running the notebook by hand in JupyterLab just sees the line.

*Around the notebook* (the runner): :func:`run_gate` runs each validation notebook with papermill in
a kernel of this very interpreter, collects the recorded checks and decides. Everything it saw is kept
beside the version::

    <registry>/<name>/versions/<n>/gates/<run-id>/
        <notebook>.ipynb         the executed notebook (also when it failed; the failing cell is marked)
        <notebook>.checks.jsonl  what the notebook recorded (kernel identity, artifact, checks)
        <notebook>.kernel.log    the kernel process's own stdout/stderr
        report.html              verdict, table of checks, then every executed notebook (nbconvert)
        result.json              the verdict; written last, so its presence means the run is whole

``result.json`` with ``"passed": true`` and the version's ``artifact_sha256`` is what
:meth:`kit.registry.Registry.passing_gate` requires before a promotion or a canary.

A gate that ran and said no is a verdict (``GateResult.passed`` is False). :class:`~kit.errors.GateError`
means the gate could not run at all: a missing notebook, a parameter the notebook does not declare,
a kernel that does not exist.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit._io import append_line, atomic_write_json, atomic_write_text, sha256_file
from kit.errors import GateError

log = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "validation" / "default.ipynb"
# Parameters run_gate fills in from NAME@VERSION (only where the notebook declares them). A caller
# may not set them: the verdict is bound to one artifact, so the notebook must test that one.
AUTO_PARAMS = ("registry", "model_name", "version")
PRIVATE_KERNEL = "kit-gate"  # a kernelspec made on the fly for sys.executable; nothing is installed
KIT_KERNEL = "kit"  # what `make env` installs with --sys-prefix; registered here when missing
START_TIMEOUT = 60.0
SETUP_TAG = "kit-gate-setup"

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Check:
    """One recorded check: a name, a verdict and the evidence behind it."""

    name: str
    passed: bool
    value: Any = None
    threshold: Any = None
    detail: str | None = None
    notebook: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Check":
        return cls(name=str(d["name"]), passed=d["passed"] is True, value=d.get("value"),
                   threshold=d.get("threshold"), detail=d.get("detail"), notebook=d.get("notebook"))

    def line(self) -> str:
        """``PASS  accuracy = 0.9733 (threshold 0.9)``"""
        s = f"{'PASS' if self.passed else 'FAIL'}  {self.name}"
        if self.value is not None:
            s += f" = {_fmt(self.value)}"
        if self.threshold is not None:
            s += f" (threshold {_fmt(self.threshold)})"
        if self.detail:
            s += f": {self.detail}"
        return s


@dataclass(frozen=True)
class NotebookRun:
    """How one notebook of a gate run went.

    ``status`` is ``passed``, ``failed`` (ran to the end but a check failed or none was recorded),
    ``error`` (a cell raised), ``timeout`` (a cell ran past the execution timeout) or
    ``dead-kernel`` (the kernel process died).
    """

    notebook: str
    executed: Path
    status: str
    seconds: float
    checks: int = 0
    error: str | None = None
    cell: int | None = None
    ename: str | None = None
    evalue: str | None = None
    notebook_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class GateResult:
    """The verdict of one gate run, and where its evidence lies."""

    run_id: str
    passed: bool
    name: str
    version: int
    artifact_sha256: str
    run_dir: Path
    report: Path
    checks: tuple[Check, ...]
    notebooks: tuple[NotebookRun, ...]
    error: str | None
    seconds: float
    started: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    kernel: dict[str, Any] = field(default_factory=dict)
    registry_root: Path | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def failed_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def _rel(self, p: Path) -> str:
        if self.registry_root is not None:
            try:
                return str(p.relative_to(self.registry_root))
            except ValueError:
                pass
        return str(p)

    def to_dict(self) -> dict[str, Any]:
        """What result.json holds. Paths are relative to the registry root."""
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "passed": self.passed,
            "name": self.name,
            "version": self.version,
            "artifact_sha256": self.artifact_sha256,
            "started": self.started,
            "seconds": self.seconds,
            "error": self.error,
            "report": self._rel(self.report),
            "run_dir": self._rel(self.run_dir),
            "params": self.params,
            "kernel": self.kernel,
            "checks": [c.to_dict() for c in self.checks],
            "notebooks": [
                {**dataclasses.asdict(n), "executed": self._rel(n.executed)} for n in self.notebooks
            ],
        }


# --------------------------------------------------------------------------- recording API (in the kernel)


@dataclass
class _Run:
    records: Path
    notebook: str
    run_id: str


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


def artifact(model_version_or_sha: Any) -> str:
    """Record which artifact this notebook loaded (a ``ModelVersion`` or its sha256).

    run_gate fails the run when a notebook loaded anything but the artifact being gated.
    """
    sha = getattr(model_version_or_sha, "artifact_sha256", model_version_or_sha)
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise GateError(f"gate.artifact needs a ModelVersion or a sha256 hex string, got {model_version_or_sha!r}.")
    ref = getattr(model_version_or_sha, "ref", None)
    if _run is not None:
        _append(_run.records, {"kind": "artifact", "sha256": sha, "ref": ref})
    print(f"artifact {ref + ' ' if ref else ''}sha256 {sha[:12]}", flush=True)
    return sha


def checks() -> tuple[Check, ...]:
    """The checks recorded so far in this kernel (this run, or this hand-run session)."""
    return tuple(_session)


def summary() -> "CheckTable":
    """A table of this kernel's checks; displays as HTML in a notebook and as text elsewhere."""
    return CheckTable(tuple(_session))


def running_under_gate() -> bool:
    """True when this kernel was started by :func:`run_gate` (checks go to the run's records)."""
    return _run is not None


def _begin_run(records: str, notebook: str, run_id: str) -> None:
    """Called by the setup cell run_gate puts first in the notebook; not for notebook authors."""
    global _run
    _run = _Run(Path(records), notebook, run_id)
    _session.clear()
    _append(_run.records, {"kind": "kernel", "executable": sys.executable, "prefix": sys.prefix,
                           "pid": os.getpid(), "python": sys.version.split()[0], "run_id": run_id,
                           "kit": str(Path(__file__).resolve())})


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


def checks_html(checks: Sequence[Check], *, with_notebook: bool = False) -> str:
    """An HTML table of checks with coloured PASS/FAIL cells (inline styles: survives any template)."""
    if not checks:
        return ("<p style='color:#b00020;font-weight:bold'>No checks were recorded. A gate needs at least "
                "one kit.gate.check(...) per notebook.</p>")
    head = ["Result", "Check", "Value", "Threshold", "Detail"] + (["Notebook"] if with_notebook else [])
    th = "".join(f"<th style='text-align:left;padding:4px 10px;border-bottom:2px solid #444'>{h}</th>" for h in head)
    rows = []
    for c in checks:
        colour = "#1b7f3b" if c.passed else "#b00020"
        cells = [f"<td style='padding:4px 10px;color:white;background:{colour};font-weight:bold'>"
                 f"{'PASS' if c.passed else 'FAIL'}</td>"]
        for v in (c.name, _fmt(c.value), _fmt(c.threshold), c.detail or ""):
            cells.append(f"<td style='padding:4px 10px;border-bottom:1px solid #ddd'>{html.escape(str(v))}</td>")
        if with_notebook:
            cells.append(f"<td style='padding:4px 10px;border-bottom:1px solid #ddd'>{html.escape(c.notebook or '')}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<table class='kit-gate-checks' style='border-collapse:collapse;font-family:sans-serif;margin:0'>"
            f"<thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


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


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _text_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- parameters


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["min_accuracy=0.9", "data=/tmp/x.npz"]`` -> ``{"min_accuracy": 0.9, "data": "/tmp/x.npz"}``.

    Values are read as JSON when they parse (numbers, true/false/null, "quoted", [lists]); Python's
    True/False/None work too; anything else is a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise GateError(f"Parameter {item!r} is not key=value with a Python identifier as key "
                            "(e.g. -p min_accuracy=0.95).")
        out[key] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    s = raw.strip()
    if s in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[s]
    try:
        return json.loads(s)
    except ValueError:
        return raw


_ASSIGN = re.compile(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)")


def declared_params(notebook: Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its cell tagged ``parameters`` (papermill's inspection).

    papermill skips, with only a log warning, an assignment it cannot parse (a quote inside a trailing
    comment is enough); such a parameter would silently keep its default, so that is a GateError here.
    """
    import nbformat
    import papermill

    try:
        declared = dict(papermill.inspect_notebook(str(notebook)))
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception as exc:  # papermill raises plain exceptions for unreadable notebooks
        raise GateError(f"Cannot read the parameters of {notebook}: {type(exc).__name__}: {exc}") from exc
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    assigned = [m.group(1) for m in map(_ASSIGN.match, (cell.source.splitlines() if cell else [])) if m]
    missed = [n for n in assigned if n not in declared]
    if missed:
        raise GateError(
            f"papermill cannot parse the assignment of {', '.join(missed)} in the 'parameters' cell of "
            f"{notebook}, so it could not be set. Keep each parameter to `name = value`, with any comment "
            "on its own line."
        )
    return declared


def check_params(notebook: Path, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Raise GateError naming any parameter ``notebook`` does not declare; return the declared ones."""
    declared = declared_params(notebook)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none (it has no cell tagged 'parameters')"
        raise GateError(
            f"{notebook.name} does not declare parameter(s) {', '.join(unknown)}; it declares: {known}. "
            "Fix the name, or add the parameter to the notebook's cell tagged 'parameters'."
        )
    return declared


# --------------------------------------------------------------------------- kernels


def _kernel_manager_class(kernel_name: str, log_path: Path) -> type:
    """A kernel manager that runs ``sys.executable`` (for the private kernel) and logs to a file.

    The kernel's own stdout/stderr (ipykernel warnings, a segfault's last words) go to
    ``log_path`` in the run folder: evidence, and no noise on the caller's terminal.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    private = kernel_name == PRIVATE_KERNEL

    class GateKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> Any:
            if private:
                if self._kernel_spec is None:
                    self._kernel_spec = KernelSpec(
                        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                        display_name=f"Kit gate ({sys.prefix})", language="python", name=PRIVATE_KERNEL,
                        resource_dir="", metadata={})
                return self._kernel_spec
            return super().kernel_spec

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            with open(log_path, "ab") as fh:  # the child keeps its own copy of the descriptor
                kw.setdefault("stdout", fh)
                kw.setdefault("stderr", fh)
                await super()._async_launch_kernel(kernel_cmd, **kw)

    return GateKernelManager


def ensure_kernel(kernel_name: str | None) -> str:
    """The kernel to run: None -> a private spec for this interpreter; a named one must exist.

    ``"kit"`` (what ``make env`` installs) is registered into ``sys.prefix`` when missing.
    """
    if kernel_name is None or kernel_name == PRIVATE_KERNEL:
        return PRIVATE_KERNEL
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(kernel_name)
        return kernel_name
    except NoSuchKernel:
        if kernel_name != KIT_KERNEL:
            have = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
            raise GateError(
                f"No Jupyter kernel named {kernel_name!r} (have: {have}). Leave kernel_name unset to run "
                f"in this interpreter ({sys.executable}), or install it with "
                f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`."
            ) from None
    from ipykernel.kernelspec import install

    path = install(kernel_name=KIT_KERNEL, prefix=sys.prefix, display_name=f"Kit ({Path(sys.prefix).name})")
    log.info("registered the %r kernelspec at %s", KIT_KERNEL, path)
    return kernel_name


# --------------------------------------------------------------------------- the runner


def _utc_stamp() -> tuple[str, str]:
    now = dt.datetime.now(dt.timezone.utc)
    return (now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z",
            now.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _load_notebook(path: Path) -> Any:
    import nbformat

    if not path.is_file():
        raise GateError(f"Validation notebook {path} does not exist. Pass an existing .ipynb "
                        f"(the default is {DEFAULT_NOTEBOOK}).")
    try:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # nbformat raises several unrelated types for broken files
        raise GateError(f"{path} is not a valid Jupyter notebook ({type(exc).__name__}: {exc}). "
                        "Open and re-save it in JupyterLab.") from exc
    return nb


def _prepare(nb: Any, records: Path, label: str, run_id: str) -> tuple[Any, dict[str, int]]:
    """A copy of ``nb`` with cell ids and the setup cell that points kit.gate at ``records``."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = 4, max(int(nb.get("nbformat_minor", 0)), 5)
    positions: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        if not cell.get("id"):
            cell["id"] = f"kit-cell-{i}"
        positions[cell["id"]] = i + 1  # 1-based, as a person counts cells in the notebook
    kit_home = str(Path(__file__).resolve().parent.parent)
    setup = nbformat.v4.new_code_cell(
        "# Added by kit.gate.run_gate (not part of the notebook): send this run's checks to its records.\n"
        "try:\n"
        "    import kit.gate\n"
        "except ModuleNotFoundError:  # kit runs from a source checkout: use the caller's copy\n"
        "    import sys\n"
        f"    sys.path.append({kit_home!r})\n"
        "    import kit.gate\n"
        f"kit.gate._begin_run({str(records)!r}, {label!r}, {run_id!r})"
    )
    setup["id"] = "kit-gate-setup"
    setup.metadata["tags"] = [SETUP_TAG]
    nb.cells.insert(0, setup)
    return nb, positions


def _read_records(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("unreadable line in %s: %r", path, line[:200])  # a kernel killed mid-write
    return out


@dataclass
class _Culprit:
    nb: Any  # the executed notebook as saved
    cell: Any  # the cell in it that failed
    position: int | None  # 1-based position of that cell in the source notebook (None: kit's setup cell)

    @property
    def where(self) -> str:
        return f"cell {self.position}" if self.position else "the setup cell kit adds"

    @property
    def source_line(self) -> str:
        line = next((ln for ln in self.cell.source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
        line = line.strip()
        return line if len(line) <= 80 else line[:77] + "..."


def _locate(executed: Path, positions: Mapping[str, int], failed_status: bool) -> _Culprit | None:
    """The cell that failed (papermill marks it) or, after a timeout or a dead kernel, the last one started."""
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # the notebook was never written: nothing to point at
        return None
    culprit = None
    for cell in nb.cells:
        pm = cell.metadata.get("papermill", {})
        if failed_status and pm.get("status") == "failed":
            culprit = cell
            break
        if not failed_status and cell.cell_type == "code" and pm.get("start_time"):
            culprit = cell
    return None if culprit is None else _Culprit(nb, culprit, positions.get(culprit.get("id")))


def _mark_failure(executed: Path, found: _Culprit, headline: str, ename: str, evalue: str) -> None:
    """After a timeout or a dead kernel papermill marks nothing: mark the cell as it does for errors."""
    import nbformat
    from papermill.execute import ERROR_MARKER_TAG

    nb, cell = found.nb, found.cell
    pm = cell.metadata.setdefault("papermill", {})
    pm["status"], pm["exception"] = "failed", True
    if not any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
        cell.outputs.append(nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"]))
    style = 'style="color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;"'
    banner = nbformat.v4.new_markdown_cell(f'<span {style}>{html.escape(headline)} '
                                           f'(<a href="#kit-gate-failed-cell">go to the cell</a>).</span>')
    anchor = nbformat.v4.new_markdown_cell(f'<span id="kit-gate-failed-cell" {style}>{html.escape(headline)}:</span>')
    for c in (banner, anchor):
        c.metadata["tags"] = [ERROR_MARKER_TAG]
    idx = nb.cells.index(cell)
    nb.cells.insert(idx, anchor)
    nb.cells.insert(0, banner)
    atomic_write_text(executed, nbformat.writes(nb))


def _run_one(
    src: Path, nb: Any, executed: Path, records: Path, kernel_log: Path, params: dict[str, Any],
    kernel_name: str, timeout: float, run_id: str,
) -> tuple[str, str | None, int | None, str | None, str | None]:
    """Run one notebook; returns (status, error, cell, ename, evalue). Never raises for a verdict."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    prepared, positions = _prepare(nb, records, executed.name, run_id)
    status, error, cell, ename, evalue = "passed", None, None, None, None
    try:
        papermill.execute_notebook(
            prepared, str(executed), parameters=params, kernel_name=kernel_name, language="python",
            progress_bar=False, log_output=False, start_timeout=START_TIMEOUT, report_mode=False,
            cwd=str(src.parent), execution_timeout=timeout,
            kernel_manager_class=_kernel_manager_class(kernel_name, kernel_log),
        )
    except PapermillExecutionError as exc:
        found = _locate(executed, positions, failed_status=True)
        cell = found.position if found else None
        status, ename, evalue = "error", exc.ename, exc.evalue
        where = found.where if found else f"cell index {exc.cell_index}"
        error = f"{src.name}: {where} raised {exc.ename}: {exc.evalue}" + (
            f"  [{found.source_line}]" if found and found.source_line else "")
    except (CellTimeoutError, DeadKernelError) as exc:
        dead = isinstance(exc, DeadKernelError)
        found = _locate(executed, positions, failed_status=False)
        cell = found.position if found else None
        status, ename = ("dead-kernel" if dead else "timeout"), type(exc).__name__
        where = found.where if found else "a cell"
        if dead:
            evalue = "the kernel process died (crashed, was killed, or ran out of memory)"
            headline = f"The kernel died while running {where}"
        else:
            evalue = f"the cell ran longer than the execution timeout of {timeout:g}s"
            headline = f"Timed out after {timeout:g}s while running {where}"
        if found:
            _mark_failure(executed, found, headline, ename, evalue)
        error = f"{src.name}: {where} {'killed the kernel' if dead else 'timed out'}: {evalue}" + (
            f"  [{found.source_line}]" if found and found.source_line else "") + f"; kernel log: {kernel_log.name}"
    except Exception as exc:
        # A kernel that never started, or papermill failing in a way this code does not know:
        # still a verdict (fail closed) with whatever evidence exists.
        status, ename, evalue = "error", type(exc).__name__, str(exc)
        error = f"{src.name}: could not be executed: {type(exc).__name__}: {exc}; kernel log: {kernel_log.name}"
    return status, error, cell, ename, evalue


def evidence_problems(records: Sequence[Mapping[str, Any]], ref: str, artifact_sha256: str,
                      prefix: str) -> list[str]:
    """What in a notebook's records breaks the gate's promises, besides failed checks.

    The kernel must have run the environment at ``prefix`` (the one that will serve), and every
    artifact the notebook declared with :func:`artifact` must be the one being gated.
    """
    problems = []
    for r in records:
        if r.get("kind") == "kernel" and Path(str(r.get("prefix"))).resolve() != Path(prefix).resolve():
            problems.append(f"the kernel ran {r.get('executable')} (prefix {r.get('prefix')}), not this "
                            f"environment ({prefix}); validate in the environment that will serve")
        if r.get("kind") == "kernel" and r.get("kit") and r["kit"] != str(Path(__file__).resolve()):
            problems.append(f"the kernel imported kit from {r['kit']}, this process from "
                            f"{Path(__file__).resolve()}; install kit once in the environment (make env)")
        if r.get("kind") == "artifact" and r.get("sha256") != artifact_sha256:
            problems.append(f"it loaded artifact {r.get('ref') or ''} sha256 {str(r.get('sha256'))[:12]}, "
                            f"not {ref} ({artifact_sha256[:12]})".replace("artifact  sha256", "artifact sha256"))
    return problems


def run_gate(
    registry: Any,
    name: str,
    version: int | str,
    notebooks: Sequence[str | Path] | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    kernel_name: str | None = None,
    progress: Progress | None = None,
) -> GateResult:
    """Run the validation notebooks against ``name@version`` and record the verdict beside it.

    Parameters
    ----------
    registry : kit.registry.Registry
    name, version : the model and version (a number, ``"latest"``, ``"production"``, ``"canary"``).
    notebooks : validation notebooks to run, in order; default ``notebooks/validation/default.ipynb``.
    params : parameters for every notebook; each must declare each one (else GateError). ``registry``,
        ``model_name`` and ``version`` are filled in from the arguments where a notebook declares them.
    timeout : seconds any one cell may run (papermill's execution timeout).
    kernel_name : a Jupyter kernel; default: a private kernelspec for this very interpreter.
    progress : called with one line per step (the CLI passes ``click.echo``).

    Returns
    -------
    GateResult : ``passed`` only if every notebook ran without error, recorded at least one check,
        and every check passed. Failing is a verdict, not an exception.
    """
    say = progress or (lambda _line: None)
    t0 = time.perf_counter()
    mv = registry.get(name, version)
    bad = [r for r in registry.verify(mv.name, mv.version) if not r.ok]
    if bad:
        raise GateError(f"{mv.ref} fails its sha256 check ({'; '.join(bad[0].problems)}); a gate on it would "
                        "prove nothing. Restore the files or register the model again.")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise GateError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    paths = [Path(p).expanduser().resolve() for p in (notebooks or [DEFAULT_NOTEBOOK])]
    params = dict(params or {})
    reserved = sorted(set(params) & set(AUTO_PARAMS))
    if reserved:
        raise GateError(f"Don't pass {', '.join(reserved)}: the gate sets them from {mv.ref} itself, so the "
                        "notebook tests exactly the artifact being gated. Gate another version with NAME@VERSION.")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GateError(f"Gate parameters must be JSON values (numbers, strings, lists...): {exc}") from exc
    loaded = [(p, _load_notebook(p)) for p in paths]
    auto = {"registry": str(registry.root), "model_name": mv.name, "version": mv.version}
    per_nb = []
    for p, _nb in loaded:  # every notebook is checked before any runs
        declared = check_params(p, params)
        per_nb.append({**{k: v for k, v in auto.items() if k in declared}, **params})
    kernel = ensure_kernel(kernel_name)

    run_id, started = _utc_stamp()
    run_id = f"{run_id}-{uuid.uuid4().hex[:6]}"
    run_dir = registry.gate_root(mv.name, mv.version) / run_id
    run_dir.mkdir(parents=True)
    log.info("gate %s on %s: %d notebook(s), evidence in %s", run_id, mv.ref, len(paths), run_dir)

    all_checks: list[Check] = []
    runs: list[NotebookRun] = []
    kernels: list[dict[str, Any]] = []
    used: set[str] = set()
    for i, ((src, nb), nb_params) in enumerate(zip(loaded, per_nb), 1):
        stem = src.stem
        while stem in used:
            stem += "-2"
        used.add(stem)
        executed = run_dir / f"{stem}.ipynb"
        records = run_dir / f"{stem}.checks.jsonl"
        kernel_log = run_dir / f"{stem}.kernel.log"
        say(f"[{i}/{len(loaded)}] {src.name}: running on {mv.ref} ...")
        t = time.perf_counter()
        status, error, cell, ename, evalue = _run_one(
            src, nb, executed, records, kernel_log, nb_params, kernel, float(timeout), run_id)
        seconds = round(time.perf_counter() - t, 2)

        recs = _read_records(records)
        nb_checks = [Check.from_dict({**r, "notebook": executed.name}) for r in recs if r.get("kind") == "check"]
        all_checks.extend(nb_checks)
        k = next((r for r in recs if r.get("kind") == "kernel"), None)
        if k:
            kernels.append({"notebook": executed.name, **{x: k.get(x) for x in ("executable", "prefix", "python", "kit")}})
        problems = evidence_problems(recs, mv.ref, mv.artifact_sha256, sys.prefix)
        if status == "passed":
            failed = [c for c in nb_checks if not c.passed]
            if failed:
                problems.insert(0, "check(s) failed: " + "; ".join(c.line()[6:] for c in failed))
            if not nb_checks:
                problems.insert(0, "it recorded no check (a gate needs at least one kit.gate.check(...) "
                                   "per notebook)")
            if problems:
                status, error = "failed", f"{src.name}: " + "; ".join(problems)
        elif problems:
            error = f"{error}; also: {'; '.join(problems)}"
        runs.append(NotebookRun(notebook=str(src), executed=executed, status=status, seconds=seconds,
                                checks=len(nb_checks), error=error, cell=cell, ename=ename, evalue=evalue,
                                notebook_sha256=sha256_file(src)))
        say(f"[{i}/{len(loaded)}] {src.name}: {status}, {len(nb_checks)} check(s) "
            f"({sum(c.passed for c in nb_checks)} passed) in {seconds:.1f}s")
        log.info("gate %s: %s %s in %.1fs", run_id, src.name, status, seconds)

    passed = all(r.ok for r in runs)
    errors = [r.error for r in runs if r.error]
    result = GateResult(
        run_id=run_id, passed=passed, name=mv.name, version=mv.version, artifact_sha256=mv.artifact_sha256,
        run_dir=run_dir, report=run_dir / "report.html", checks=tuple(all_checks), notebooks=tuple(runs),
        error=None if passed else " | ".join(errors) or "the gate did not pass",
        seconds=round(time.perf_counter() - t0, 2), started=started, params=params,
        kernel={"name": kernel, "caller_executable": sys.executable, "caller_prefix": sys.prefix,
                "kernels": kernels},
        registry_root=Path(registry.root),
    )
    try:
        write_report(result)
    except Exception as exc:  # a report that cannot render must not lose the verdict
        log.warning("could not render %s: %s", result.report, exc)
        atomic_write_text(result.report, f"<pre>{html.escape(render_text(result))}\n\n(report rendering "
                                         f"failed: {html.escape(str(exc))})</pre>")
    atomic_write_json(run_dir / "result.json", result.to_dict())
    registry.record_event(
        mv.name, "gate", version=mv.version, run_id=run_id, passed=passed, artifact_sha256=mv.artifact_sha256,
        checks=len(all_checks), failed=[c.name for c in result.failed_checks], error=result.error,
        report=result.to_dict()["report"], seconds=result.seconds,
        notebooks=[Path(r.notebook).name for r in runs],
    )
    log.info("gate %s on %s: %s", run_id, mv.ref, "passed" if passed else f"FAILED: {result.error}")
    return result


# --------------------------------------------------------------------------- evidence for people


def render_text(result: GateResult) -> str:
    """The verdict as a terminal shows it: a table of checks, notebook problems, the report path."""
    rows = [("PASS" if c.passed else "FAIL", c.name, _fmt(c.value), _fmt(c.threshold), c.notebook or "")
            for c in result.checks]
    lines = [_text_table(rows, ("RESULT", "CHECK", "VALUE", "THRESHOLD", "NOTEBOOK")) if rows
             else "No checks were recorded."]
    for r in result.notebooks:
        if r.error:
            lines.append(f"{r.status.upper()}: {r.error}")
    lines.append(f"gate {'PASSED' if result.passed else 'FAILED'}: {result.ref} sha256 {result.artifact_sha256[:12]} "
                 f"run {result.run_id} in {result.seconds:.1f}s")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)


def write_report(result: GateResult) -> Path:
    """report.html: the verdict and table of checks, then each executed notebook (nbconvert)."""
    import nbformat
    from nbconvert import HTMLExporter

    verdict = "PASSED" if result.passed else "FAILED"
    colour = "#1b7f3b" if result.passed else "#b00020"
    nb_rows = "".join(
        f"<tr><td style='padding:2px 10px'>{html.escape(Path(r.notebook).name)}</td>"
        f"<td style='padding:2px 10px;color:{'#1b7f3b' if r.ok else '#b00020'};font-weight:bold'>{r.status}</td>"
        f"<td style='padding:2px 10px'>{r.checks}</td><td style='padding:2px 10px'>{r.seconds:.1f}s</td>"
        f"<td style='padding:2px 10px'>{html.escape(r.error or '')}</td></tr>"
        for r in result.notebooks)
    head = (
        f"<h1 style='color:{colour}'>Gate {verdict}: {html.escape(result.ref)}</h1>\n"
        f"<p>artifact sha256 <code>{result.artifact_sha256}</code><br>run <code>{result.run_id}</code>, "
        f"started {html.escape(result.started)}, {result.seconds:.1f}s, kernel "
        f"<code>{html.escape(sys.executable)}</code></p>\n"
        + (f"<p style='color:#b00020;font-weight:bold'>{html.escape(result.error)}</p>\n" if result.error else "")
        + "<h2>Checks</h2>\n" + checks_html(result.checks, with_notebook=True)
        + "\n<h2>Notebooks</h2>\n<table style='border-collapse:collapse;font-family:sans-serif;margin:0'>"
        "<tr><th style='text-align:left;padding:2px 10px'>Notebook</th><th style='text-align:left;padding:2px 10px'>"
        "Status</th><th style='text-align:left;padding:2px 10px'>Checks</th><th style='text-align:left;"
        "padding:2px 10px'>Time</th><th style='text-align:left;padding:2px 10px'>Error</th></tr>"
        + nb_rows + "</table>\n"
        + (f"<h2>Parameters</h2><pre>{html.escape(json.dumps(result.params, indent=2, sort_keys=True))}</pre>"
           if result.params else "")
    )
    book = nbformat.v4.new_notebook(metadata={"language_info": {"name": "python"}})
    book.cells.append(nbformat.v4.new_markdown_cell(head))
    for r in result.notebooks:
        book.cells.append(nbformat.v4.new_markdown_cell(
            f"<hr><h1>Notebook {html.escape(Path(r.notebook).name)}: {r.status}</h1>"))
        try:
            executed = nbformat.read(str(r.executed), as_version=4)
            book.cells.extend(executed.cells)
        except Exception as exc:  # nothing was written (the kernel never started)
            book.cells.append(nbformat.v4.new_markdown_cell(
                f"<p>The executed notebook could not be read: {html.escape(str(exc))}</p>"))
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": f"Gate {verdict} {result.ref}"}})
    atomic_write_text(result.report, body)
    return result.report
