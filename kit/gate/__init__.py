"""Validation gates: notebooks that must pass against an exact artifact before it serves traffic.

*Inside a notebook* (the recording API, :mod:`kit.gate.record`)::

    from kit import gate
    gate.check("accuracy", passed=acc >= min_accuracy, value=acc, threshold=min_accuracy)

*Around the notebook* (the runner, :mod:`kit.gate.runner`): :func:`run_gate` runs each validation
notebook with papermill in a kernel of this very interpreter, collects the recorded checks and decides.

The modules:

- :mod:`kit.gate.evidence`: checks, notebook runs, the verdict (``result.json``), ``report.html``. Where the
  evidence lives and what makes a result a pass is the core's :mod:`kit.evidence`, which the registry
  imports (never this package: a serving worker does not load the gate).
- :mod:`kit.gate.record`: ``check``, ``artifact``, ``summary``, ``open_registry`` (what a notebook calls).
- :mod:`kit.gate.params`: the one parser of gate parameters (``%deploy --param``, ``kit validate -p``)
  and what a notebook declares.
- :mod:`kit.gate.kernel`: the kernel a gate runs in.
- :mod:`kit.gate.runner`: :func:`run_gate` (the notebooks run in a private folder of the gate process).
- :mod:`kit.gate.publish`: the run's evidence into the registry, once the verdict is decided and signed.
- :mod:`kit.gate.suite`: the default checks of the candidate alone; :mod:`kit.gate.compare`: the candidate
  against production (agreement, latency ratio, quality, size), in the same kernel.
- :mod:`kit.gate.production`: the production version a gate compares with (resolved and verified by the
  gate process); :mod:`kit.gate.progress`: each check's start and figure shown while a notebook runs.
"""

from kit.gate.evidence import (
    SCHEMA,
    Check,
    GateResult,
    NotebookRun,
    checks_html,
    read_results,
    render_text,
    write_report,
)
from kit.gate.kernel import KIT_KERNEL, PRIVATE_KERNEL, ensure_kernel
from kit.gate.params import AUTO_PARAMS, BACKEND_PARAM, check_params, declared_params, gate_backend, parse_params
from kit.gate.record import (
    CheckTable,
    _begin_run,
    artifact,
    baseline,
    check,
    checks,
    open_registry,
    running_under_gate,
    set_budget,
    step,
    summary,
)
from kit.gate.runner import DEFAULT_NOTEBOOK, evidence_problems, run_gate

__all__ = [
    "AUTO_PARAMS", "BACKEND_PARAM", "DEFAULT_NOTEBOOK", "KIT_KERNEL", "PRIVATE_KERNEL", "SCHEMA", "Check", "CheckTable",
    "GateResult", "NotebookRun", "artifact", "baseline", "check", "set_budget", "step", "check_params", "checks", "checks_html",
    "declared_params", "ensure_kernel", "gate_backend", "evidence_problems", "open_registry", "parse_params",
    "read_results",
    "render_text", "run_gate", "running_under_gate", "summary", "write_report", "_begin_run",
]
