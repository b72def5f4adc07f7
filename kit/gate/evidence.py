"""The gate's evidence as the gate writes it: checks, notebook runs, the verdict, the report.

Where a run's evidence lives and what makes a result a pass is the core's (:mod:`kit.evidence`, which the
registry imports); this module adds what only the gate needs: the records a notebook appends
(:func:`read_records`), the :class:`GateResult` that becomes ``result.json`` (:func:`result_bytes`), and
``report.html`` (nbconvert, imported inside :func:`write_report`).

A run is executed in a private folder of the gate process (see :mod:`kit.gate.runner`); the registry's
``versions/<n>/gates/<run-id>/`` receives its evidence only when the verdict is decided and signed.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit._io import atomic_write_text
from kit._types import JSONObject
from kit.evidence import (
    GATES_DIR,
    REPORT_FILE,
    RESULT_FILE,
    SCHEMA,
    gates_dir,
    on_backend,
    passing_result,
    read_results,
    report_path,
    result_backend,
    verdict,
)

log = logging.getLogger(__name__)

__all__ = [  # the core's names are re-exported: kit.gate.evidence stays the one import for the gate's users
    "GATES_DIR", "REPORT_FILE", "RESULT_FILE", "SCHEMA", "Check", "GateResult", "NotebookRun", "checks_html",
    "gates_dir", "on_backend", "passing_result", "read_records", "read_results", "render_text", "report_path",
    "result_backend", "result_bytes", "verdict", "write_report",
]


@dataclass(frozen=True)
class Check:
    """One recorded check: a name, a verdict and the evidence behind it."""

    name: str
    passed: bool
    value: Any = None
    threshold: Any = None
    detail: str | None = None
    notebook: str | None = None

    def to_dict(self) -> JSONObject:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Check:
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
    params: JSONObject = field(default_factory=dict)
    kernel: JSONObject = field(default_factory=dict)
    registry_root: Path | None = None
    backend: str = "torch"  # what loaded the model in the notebooks: the backend this verdict is about
    files: dict[str, str] = field(default_factory=dict)  # evidence file name -> sha256, as the gate copied it
    # what the candidate was compared with: {"version", "artifact_sha256", "note"} (version None: nothing)
    baseline: JSONObject = field(default_factory=dict)

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

    def to_dict(self) -> JSONObject:
        """What result.json holds. Paths are relative to the registry root."""
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "passed": self.passed,
            "name": self.name,
            "version": self.version,
            "artifact_sha256": self.artifact_sha256,
            "backend": self.backend,
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
            "files": dict(sorted(self.files.items())),
            "baseline": self.baseline,
        }



# --------------------------------------------------------------------------- the result, as the gate writes it


def result_bytes(result: GateResult) -> bytes:
    """result.json's exact bytes: what the gate writes, signs and nothing else."""
    return (json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def read_records(path: Path) -> list[JSONObject]:
    """The records a notebook appended (``<notebook>.checks.jsonl``); a torn last line is skipped."""
    out: list[JSONObject] = []
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


# --------------------------------------------------------------------------- evidence for people


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



def _fmt(v: object) -> str:
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


def render_text(result: GateResult) -> str:
    """The verdict as a terminal shows it: a table of checks, notebook problems, the report path."""
    rows = [("PASS" if c.passed else "FAIL", c.name, _fmt(c.value), _fmt(c.threshold), c.notebook or "")
            for c in result.checks]
    lines = [_text_table(rows, ("RESULT", "CHECK", "VALUE", "THRESHOLD", "NOTEBOOK")) if rows
             else "No checks were recorded."]
    for r in result.notebooks:
        if r.error:
            lines.append(f"{r.status.upper()}: {r.error}")
    if result.baseline:
        lines.append(_baseline_text(result))
    lines.append(f"gate {'PASSED' if result.passed else 'FAILED'}: {result.ref} sha256 {result.artifact_sha256[:12]} "
                 f"on backend {result.backend}, run {result.run_id} in {result.seconds:.1f}s")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)


def _baseline_text(result: GateResult) -> str:
    b = result.baseline
    if b.get("version") is None:
        return f"Compared with: nothing ({b.get('note')})."
    return (f"Compared with production {result.name}@{b['version']} (sha256 {str(b.get('artifact_sha256'))[:12]}), "
            "loaded beside the candidate in the same kernel: see the checks marked 'vs production'.")


def write_report(result: GateResult, meta: Mapping[str, Any] | None = None) -> Path:
    """report.html: the verdict, the model card (:mod:`kit.gate.card`; from ``meta``, the version's meta.json
    as the gate verified it, else read beside the run folder), the table of checks, then each executed
    notebook (nbconvert)."""
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
    from kit.gate.card import model_card_html

    head = (
        f"<h1 style='color:{colour}'>Gate {verdict}: {html.escape(result.ref)}</h1>\n"
        + model_card_html(result, meta) + "\n"  # what the registry knows about the version, first
        f"<p>artifact sha256 <code>{result.artifact_sha256}</code>, backend <code>{html.escape(result.backend)}"
        f"</code><br>run <code>{result.run_id}</code>, "
        f"started {html.escape(result.started)}, {result.seconds:.1f}s, kernel "
        f"<code>{html.escape(sys.executable)}</code></p>\n"
        + (f"<p style='color:#b00020;font-weight:bold'>{html.escape(result.error)}</p>\n" if result.error else "")
        + (f"<p class='kit-gate-baseline'>{html.escape(_baseline_text(result))}</p>\n" if result.baseline else "")
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
            for k, cell in enumerate(executed.cells):  # ids unique across notebooks (each has kit's setup cell)
                cell["id"] = f"nb{len(book.cells)}-{k}"
            book.cells.extend(executed.cells)
        except Exception as exc:  # nothing was written (the kernel never started)
            book.cells.append(nbformat.v4.new_markdown_cell(
                f"<p>The executed notebook could not be read: {html.escape(str(exc))}</p>"))
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": f"Gate {verdict} {result.ref}"}})
    atomic_write_text(result.report, body)
    return result.report
