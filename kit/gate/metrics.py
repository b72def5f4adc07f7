"""Scores on the user's data for the gate: classifier accuracy and user metrics named ``module:function``
(or ``path/to/file.py:function``), and where relative data and metric paths are read."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import SupportsFloat

import numpy as np

from kit.errors import GateError


def under(base: str | Path | None, path: str | Path) -> Path:
    """``path`` as given when absolute, else in ``base`` (the folder the gate started in) when there is one."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or not base else Path(base).expanduser() / p


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Classifier accuracy: argmax over the last dim of scores; one score per row is a binary
    logit (> 0) or, when every value lies in [0, 1], a probability (> 0.5)."""
    labels = np.asarray(labels)
    if outputs.ndim == labels.ndim + 1 and outputs.shape[-1] > 1:
        pred = outputs.argmax(-1)
    else:
        scores = outputs.reshape(labels.shape) if outputs.size == labels.size else None
        if scores is None:
            raise GateError(f"Cannot compute accuracy from output shape {outputs.shape} and labels "
                            f"{labels.shape}; name another output (output=...) or a metric "
                            "(metric='module:function').")
        cut = 0.5 if scores.dtype == bool or (scores.min() >= 0 and scores.max() <= 1) else 0.0
        pred = scores > cut if scores.dtype != bool else scores
    return float((pred.astype(np.int64) == labels.astype(np.int64)).mean())


def resolve_metric(spec: str, base: str | Path | None = None
                   ) -> Callable[[np.ndarray, np.ndarray | None], SupportsFloat]:
    """``"module:function"`` or ``"path/to/file.py:function"`` (relative to ``base``) -> the function.
    A module is imported as installed, or from ``base`` (the project the gate was started in)."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise GateError(f"metric={spec!r} is not 'module:function' (e.g. 'myproject.metrics:f1').")
    if base and str(base) not in sys.path:
        sys.path.append(str(base))  # after everything installed: the project's own modules, last
    try:
        if mod_name.endswith(".py"):
            loc = importlib.util.spec_from_file_location(Path(mod_name).stem, under(base, mod_name))
            if loc is None or loc.loader is None:
                raise ImportError(f"no Python file at {mod_name}")
            module = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except (ImportError, OSError) as exc:
        raise GateError(f"metric={spec!r}: cannot import {mod_name} ({exc}). Install it in this "
                        "environment, or name a file: 'path/to/metrics.py:function'.") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise GateError(f"metric={spec!r}: {mod_name} has no function {fn_name}.")
    return fn
