"""Gate parameters: one parser for every face, and what a notebook declares."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kit.errors import GateError

# Parameters run_gate fills in from NAME@VERSION (only where the notebook declares them). A caller
# may not set them: the verdict is bound to one artifact, so the notebook must test that one.
AUTO_PARAMS = ("registry", "model_name", "version")


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

