"""The papermill runner: :func:`run_gate` runs each validation notebook against one artifact and decides.

A gate that ran and said no is a verdict (``GateResult.passed`` is False). :class:`~kit.errors.GateError`
means the gate could not run at all: a missing notebook, a parameter the notebook does not declare,
a kernel that does not exist. The evidence it leaves is described in :mod:`kit.gate.evidence`.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._io import atomic_write_text, sha256_file
from kit._types import JSONObject
from kit.errors import GateError, KitError
from kit.gate import production as _baseline
from kit.gate.evidence import (
    REPORT_FILE,
    Check,
    GateResult,
    NotebookRun,
    gates_dir,
    read_records,
    render_text,
    write_report,
)
from kit.gate.kernel import _kernel_manager_class, ensure_kernel
from kit.gate.params import AUTO_PARAMS, BACKEND_PARAM, check_params, gate_backend
from kit.gate.production import Baseline
from kit.gate.progress import Follower
from kit.gate.publish import publish
from kit.gate.record import kit_location

if TYPE_CHECKING:
    from nbformat import NotebookNode

    from kit.registry import Registry
    from kit.registry.records import ModelVersion

log = logging.getLogger(__name__)

# Inside the package (package-data), so an installed kit has it; `kit init` copies it into a project.
DEFAULT_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "validation" / "default.ipynb"
START_TIMEOUT = 60.0
SETUP_TAG = "kit-gate-setup"

Progress = Callable[[str], None]


def _utc_stamp() -> tuple[str, str]:
    now = dt.datetime.now(dt.UTC)
    return (now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z",
            now.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _load_notebook(path: Path) -> NotebookNode:
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


def _prepare(nb: NotebookNode, records: Path, label: str, run_id: str, trust: Sequence[str] = ()
             ) -> tuple[NotebookNode, dict[str, int]]:
    """A copy of ``nb`` with cell ids and the setup cell that points kit.gate at ``records`` (and gives it the
    public keys :func:`kit.gate.open_registry` verifies the version against)."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = 4, max(int(nb.get("nbformat_minor", 0)), 5)
    positions: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        if not cell.get("id"):
            cell["id"] = f"kit-cell-{i}"
        positions[cell["id"]] = i + 1  # 1-based, as a person counts cells in the notebook
    kit_home = str(Path(kit_location()).parent)
    setup = nbformat.v4.new_code_cell(
        "# Added by kit.gate.run_gate (not part of the notebook): send this run's checks to its records.\n"
        "try:\n"
        "    import kit.gate\n"
        "except ModuleNotFoundError:  # kit runs from a source checkout: use the caller's copy\n"
        "    import sys\n"
        f"    sys.path.append({kit_home!r})\n"
        "    import kit.gate\n"
        f"kit.gate._begin_run({str(records)!r}, {label!r}, {run_id!r}, {list(trust)!r})"
    )
    setup["id"] = "kit-gate-setup"
    setup.metadata["tags"] = [SETUP_TAG]
    nb.cells.insert(0, setup)
    return nb, positions



@dataclass
class _Culprit:
    nb: NotebookNode  # the executed notebook as saved
    cell: NotebookNode  # the cell in it that failed
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
    src: Path, nb: NotebookNode, executed: Path, records: Path, kernel_log: Path, params: JSONObject,
    kernel_name: str, timeout: float, run_id: str, trust: Sequence[str] = (),
) -> tuple[str, str | None, int | None, str | None, str | None]:
    """Run one notebook; returns (status, error, cell, ename, evalue). Never raises for a verdict."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    prepared, positions = _prepare(nb, records, executed.name, run_id, trust)
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
            evalue = (f"the cell ran longer than the execution timeout of {timeout:g}s (the gate's timeout, "
                      "gate_timeout in kit.toml; each default check also has check_budget_s)")
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
                      prefix: str, backend: str = "torch", signed: bool = False) -> list[str]:
    """What in a notebook's records breaks the gate's promises, besides failed checks.

    The kernel must have run the environment at ``prefix`` (the one that will serve), and every
    artifact the notebook declared with :func:`artifact` must be the one being gated, loaded with the
    gated ``backend`` where it says which. With ``signed`` (the gate's registry checks signatures), a
    loaded model declared without a verified signature (``signed_by`` null) breaks them too.
    """
    problems = []
    for r in records:
        if r.get("kind") == "kernel" and Path(str(r.get("prefix"))).resolve() != Path(prefix).resolve():
            problems.append(f"the kernel ran {r.get('executable')} (prefix {r.get('prefix')}), not this "
                            f"environment ({prefix}); validate in the environment that will serve")
        if r.get("kind") == "kernel" and r.get("kit") and r["kit"] != kit_location():
            problems.append(f"the kernel imported kit from {r['kit']}, this process from "
                            f"{kit_location()}; install kit once in the environment (make env)")
        if r.get("kind") == "artifact" and r.get("sha256") != artifact_sha256:
            problems.append(f"it loaded artifact {r.get('ref') or ''} sha256 {str(r.get('sha256'))[:12]}, "
                            f"not {ref} ({artifact_sha256[:12]})".replace("artifact  sha256", "artifact sha256"))
        if r.get("kind") == "artifact" and r.get("backend") not in (None, backend):
            problems.append(f"it loaded {ref} with backend {r.get('backend')}, not {backend}; load it with "
                            "Registry.load(..., backend=backend)")
        if signed and r.get("kind") == "artifact" and "signed_by" in r and not r["signed_by"]:
            problems.append(f"it loaded {ref} without checking its signature; load it through "
                            "kit.gate.open_registry(registry), which verifies it against the gate's trusted keys")
    return problems


def run_gate(
    registry: Registry,
    name: str,
    version: int | str,
    notebooks: Sequence[str | Path] | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    kernel_name: str | None = None,
    progress: Progress | None = None,
    backend: str | None = None,
) -> GateResult:
    """Run the validation notebooks against ``name@version`` and record the verdict beside it.

    Parameters
    ----------
    registry : kit.registry.Registry
    name, version : the model and version (a number, ``"latest"``, ``"production"``, ``"canary"``).
    notebooks : validation notebooks to run, in order; default: the model-agnostic notebook inside the
        package (:data:`DEFAULT_NOTEBOOK`). A notebook runs in its own folder, so it finds files beside it;
        one that declares ``caller_dir`` gets the folder the gate was started in (the default notebook reads
        a relative ``data=held_out.npz`` there).
    params : parameters for every notebook; each must declare each one (else GateError). ``registry``,
        ``model_name`` and ``version`` are filled in from the arguments, ``caller_dir`` with this process's
        working directory, ``production_version`` with the model's verified production version to compare
        with (None when there is none: :mod:`kit.gate.production`), where a notebook declares them.
    timeout : seconds any one cell may run (papermill's execution timeout).
    kernel_name : a Jupyter kernel; default: a private kernelspec for this very interpreter.
    progress : called with one line per step (the CLI passes ``click.echo``).
    backend : what loads the model in the notebooks, the backend that will serve: ``"torch"`` (default) or
        ``"onnxruntime"`` (or the parameter ``backend``). Every notebook must declare a ``backend`` parameter
        to be gated on onnxruntime; the verdict (result.json ``backend``) is about that backend only.

    Returns
    -------
    GateResult : ``passed`` only if every notebook ran without error, recorded at least one check,
        and every check passed. Failing is a verdict, not an exception.

    The notebooks run in a private folder of this process (``mkdtemp``, mode 0700, outside the registry):
    their records, executed copies and kernel logs are read there, once, and the verdict depends on
    nothing else. The registry's ``gates/<run-id>/`` receives the evidence only when the verdict is
    decided: the files copied, then ``result.json`` (holding their sha256) and its signature, both made
    from the same bytes in memory.
    """
    say = progress or (lambda _line: None)
    t0 = time.perf_counter()
    mv = _verified(registry, name, version)
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise GateError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    backend = gate_backend(dict(params or {}), backend)
    _baseline.require_artifact(mv, backend)  # before any kernel starts
    base = _baseline.resolve(registry, mv, backend)
    backend, params, plan = _plan(registry, mv, notebooks, params, backend, base)
    if not any(_baseline.PRODUCTION_PARAM in p for _, _, p in plan):
        base = Baseline(None, None, "the notebooks declare no production_version: judged on their own checks")
    say(base.line(mv.name))
    kernel = ensure_kernel(kernel_name)
    trust = registry.trust()
    gate_run = _GateRun(mv=mv, backend=backend, kernel=kernel, timeout=float(timeout), say=say,
                        trust=tuple(k.text() for k in trust.keys) if trust else (), baseline=base)
    run_dir = gates_dir(registry.version_dir(mv.name, mv.version)) / gate_run.run_id
    with tempfile.TemporaryDirectory(prefix=f"kit-gate-{gate_run.run_id}-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)  # mkdtemp: 0700, this user's; a registry writer cannot reach it
        log.info("gate %s on %s (backend %s): %d notebook(s) in %s, evidence to %s", gate_run.run_id, mv.ref,
                 backend, len(plan), work, run_dir)
        for i, (src, nb, nb_params) in enumerate(plan, 1):
            gate_run.run(work, src, nb, nb_params, f"[{i}/{len(plan)}]")
        result = gate_run.result(work, params, round(time.perf_counter() - t0, 2))
        _write_report_safely(result, gate_run.mv.to_dict())  # the card: the version as verified before the run
        result = publish(registry, result, work, run_dir)
    registry.record_event(
        mv.name, "gate", version=mv.version, run_id=result.run_id, passed=result.passed,
        artifact_sha256=mv.artifact_sha256, checks=len(result.checks), failed=[c.name for c in result.failed_checks],
        error=result.error, report=result.to_dict()["report"], seconds=result.seconds,
        notebooks=[Path(r.notebook).name for r in result.notebooks], backend=backend,
    )
    log.info("gate %s on %s: %s", result.run_id, mv.ref, "passed" if result.passed else f"FAILED: {result.error}")
    return result


def _verified(registry: Registry, name: str, version: int | str) -> ModelVersion:
    """The version to gate, as verified: meta.json read once, its signature checked (with a keyring), the
    ModelVersion parsed from those bytes, then every file's sha256 against it. The artifact sha256 the
    signed result names is that one, never a second read of meta.json a writer could have swapped."""
    from kit.registry.integrity import file_problems

    mv = registry.get(name, version)  # resolves production/canary/latest, and says so when there is no such version
    try:
        mv = registry.verified(mv.name, mv.version).version
        problems = file_problems(mv)
    except KitError as exc:  # SignatureError, IntegrityError: unsigned, untrusted, changed or copied here
        problems = [str(exc)]
    if problems:
        raise GateError(f"{mv.ref} fails verification (signature of meta.json, sha256 of its files: "
                        f"{'; '.join(problems)}); a gate on it would prove nothing. Restore the files or "
                        "register the model again.")
    return mv


def _plan(registry: Registry, mv: ModelVersion, notebooks: Sequence[str | Path] | None, params: Mapping[str, Any] | None,
          backend: str | None, base: Baseline) -> tuple[str, JSONObject, list[tuple[Path, NotebookNode, JSONObject]]]:
    """(backend, the caller's params, [(notebook, its node, its params)]): every notebook read and its
    parameters checked before any runs (GateError otherwise)."""
    paths = [Path(p).expanduser().resolve() for p in (notebooks or [DEFAULT_NOTEBOOK])]
    params = dict(params or {})
    backend = gate_backend(params, backend)
    params.pop(BACKEND_PARAM, None)
    reserved = sorted(set(params) & set(AUTO_PARAMS))
    if reserved:
        raise GateError(f"Don't pass {', '.join(reserved)}: the gate sets them itself (registry, model_name and "
                        f"version from {mv.ref}, so the notebook tests exactly the artifact being gated; caller_dir: "
                        "the folder it was started in; production_version: the model's verified production). "
                        "Gate another version with NAME@VERSION.")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GateError(f"Gate parameters must be JSON values (numbers, strings, lists...): {exc}") from exc
    loaded = [(p, _load_notebook(p)) for p in paths]
    auto = {"registry": str(registry.root), "model_name": mv.name, "version": mv.version,
            "caller_dir": str(Path.cwd()), _baseline.PRODUCTION_PARAM: base.version}
    plan = []
    for p, nb in loaded:
        declared = check_params(p, params)
        if BACKEND_PARAM not in declared and backend != "torch":
            raise GateError(f"{p.name} declares no {BACKEND_PARAM!r} parameter, so it cannot load {mv.ref} with "
                            f"backend {backend}. Add `{BACKEND_PARAM} = \"torch\"` to its cell tagged 'parameters' and "
                            f"load with reg.load(model_name, version, backend={BACKEND_PARAM}).")
        backend_param = {BACKEND_PARAM: backend} if BACKEND_PARAM in declared else {}
        plan.append((p, nb, {**{k: v for k, v in auto.items() if k in declared}, **backend_param, **params}))
    return backend, params, plan


@dataclass
class _GateRun:
    """One gate run's private state: what the notebooks recorded, read once from the private folder."""

    mv: ModelVersion
    backend: str
    kernel: str
    timeout: float
    say: Progress
    trust: tuple[str, ...]  # the public keys the notebook's registry verifies the version against
    baseline: Baseline = Baseline(None, None, "not resolved")
    run_id: str = ""
    started: str = ""
    checks: list[Check] = field(default_factory=list)
    runs: list[NotebookRun] = field(default_factory=list)
    kernels: list[JSONObject] = field(default_factory=list)
    stems: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        stamp, self.started = _utc_stamp()
        self.run_id = f"{stamp}-{uuid.uuid4().hex[:6]}"

    def run(self, work: Path, src: Path, nb: NotebookNode, params: JSONObject, step: str) -> None:
        """Run one notebook in ``work`` and judge what it recorded."""
        mv, stem = self.mv, src.stem
        while stem in self.stems:
            stem += "-2"
        self.stems.add(stem)
        executed, records, kernel_log = (work / f"{stem}{ext}" for ext in (".ipynb", ".checks.jsonl", ".kernel.log"))
        self.say(f"{step} {src.name}: running on {mv.ref} (backend {self.backend}) ...")
        t = time.perf_counter()
        with Follower(records, self.say, f"{step} "):
            status, error, cell, ename, evalue = _run_one(
                src, nb, executed, records, kernel_log, params, self.kernel, self.timeout, self.run_id, self.trust)
        seconds = round(time.perf_counter() - t, 2)
        recs = read_records(records)  # once, from the private folder: nobody else can write it
        nb_checks = [Check.from_dict({**r, "notebook": executed.name}) for r in recs if r.get("kind") == "check"]
        self.checks.extend(nb_checks)
        k = next((r for r in recs if r.get("kind") == "kernel"), None)
        if k:
            self.kernels.append({"notebook": executed.name,
                                 **{x: k.get(x) for x in ("executable", "prefix", "python", "kit")}})
        problems = evidence_problems(recs, mv.ref, mv.artifact_sha256, sys.prefix, self.backend, bool(self.trust))
        problems += _baseline.problems(recs, self.baseline, bool(self.trust))
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
        self.runs.append(NotebookRun(notebook=str(src), executed=executed, status=status, seconds=seconds,
                                     checks=len(nb_checks), error=error, cell=cell, ename=ename, evalue=evalue,
                                     notebook_sha256=sha256_file(src)))
        self.say(f"{step} {src.name}: {status}, {len(nb_checks)} check(s) "
                 f"({sum(c.passed for c in nb_checks)} passed) in {seconds:.1f}s")
        log.info("gate %s: %s %s in %.1fs", self.run_id, src.name, status, seconds)

    def result(self, work: Path, params: JSONObject, seconds: float) -> GateResult:
        """The verdict, from this run's private state only (its paths still in ``work``)."""
        passed = bool(self.runs) and all(r.ok for r in self.runs)
        errors = [r.error for r in self.runs if r.error]
        return GateResult(
            run_id=self.run_id, passed=passed, name=self.mv.name, version=self.mv.version,
            artifact_sha256=self.mv.artifact_sha256, run_dir=work, report=work / REPORT_FILE,
            checks=tuple(self.checks), notebooks=tuple(self.runs),
            error=None if passed else " | ".join(errors) or "the gate did not pass", seconds=seconds,
            started=self.started, params=params,
            kernel={"name": self.kernel, "caller_executable": sys.executable, "caller_prefix": sys.prefix,
                    "kernels": self.kernels},
            backend=self.backend, baseline=self.baseline.to_dict(),
        )


def _write_report_safely(result: GateResult, meta: Mapping[str, Any]) -> None:
    try:
        write_report(result, meta)
    except Exception as exc:  # a report that cannot render must not lose the verdict
        log.warning("could not render %s: %s", result.report, exc)
        atomic_write_text(result.report, f"<pre>{html.escape(render_text(result))}\n\n(report rendering "
                                         f"failed: {html.escape(str(exc))})</pre>")
