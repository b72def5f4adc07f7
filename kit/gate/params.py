"""Gate parameters: one parser for every face, and what a notebook declares."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kit._types import JSONObject
from kit.errors import GateError

# Parameters run_gate fills in (only where the notebook declares them): the registry, model and version
# from NAME@VERSION, and caller_dir, the folder the gate was started in (relative paths a user passes,
# such as data=held_out.npz, mean that folder). A caller may not set them: the verdict is bound to one
# artifact, so the notebook must test that one.
# production_version: the model's production version the gate resolved and verified (None: nothing to
# compare), which the notebook loads beside the candidate through the same verified path.
AUTO_PARAMS = ("registry", "model_name", "version", "caller_dir", "production_version")


BACKEND_PARAM = "backend"  # what loads the model in the notebook: "torch" or "onnxruntime"


def gate_backend(params: Mapping[str, Any], backend: str | None = None) -> str:
    """The backend a gate runs on: ``backend`` or ``params["backend"]`` (they must agree), else torch."""
    from kit.version_files import BACKENDS

    given = params.get(BACKEND_PARAM)
    if backend is not None and given is not None and given != backend:
        raise GateError(f"The gate's backend is given twice: backend={backend!r} and the parameter "
                        f"backend={given!r}; give it once.")
    chosen = backend if backend is not None else given if given is not None else "torch"
    if chosen not in BACKENDS:
        raise GateError(f"backend must be one of {', '.join(BACKENDS)}, got {chosen!r} (the backend that will "
                        "serve: service.toml [model] backend).")
    return str(chosen)


def parse_params(items: Sequence[str]) -> JSONObject:
    """``["min_accuracy=0.9", "data=/tmp/x.npz"]`` -> ``{"min_accuracy": 0.9, "data": "/tmp/x.npz"}``.

    The one rule for every face (``%deploy --param``, ``kit validate -p``, the panel): see
    :func:`parse_value`. A key must be a Python identifier; a key given twice is an error.
    """
    out: JSONObject = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise GateError(f"Parameter {item!r} is not key=value with a Python identifier as key "
                            "(e.g. min_accuracy=0.95).")
        if key in out:
            raise GateError(f"Parameter {key!r} is given twice ({key}={out[key]!r} and {item!r}); give it once.")
        out[key] = parse_value(raw)
    return out


def parse_value(raw: str) -> Any:
    """A parameter value: JSON when it parses (``0.9``, ``true``, ``"text"``, ``[1, 2]``, ``{"a": 1}``),
    else a Python literal (``True``, ``None``, ``'text'``, ``(1, 2)`` -> ``[1, 2]``), else the text itself
    (``data=/tmp/x.npz``). Numbers must be finite: a gate's parameters are stored as strict JSON.
    """
    s = raw.strip()
    try:
        value = json.loads(s)
    except ValueError:
        try:
            value = _plain(ast.literal_eval(s))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return raw
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise GateError(f"Parameter value {raw!r} is not a finite number; gate parameters are stored as "
                        "strict JSON (give a finite number, or quote it to pass text).") from None
    return value


def _plain(v: Any) -> Any:
    """A Python literal as a JSON value (tuples become lists); TypeError for sets, bytes, complex."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _plain(x) for k, x in v.items()}
    raise TypeError(type(v).__name__)


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

