"""The one rule for "these outputs match the reference": capture's parity, ONNX export's parity, a loaded
version's reference check, the gate's comparisons and ``kit pack --verify`` all ask :func:`compare`.

The rule, per output in order:

- the counts and every shape must be equal (else ``max_abs_diff`` is ``inf``);
- float and complex outputs compare in float64, elementwise ``|got - want| <= atol + rtol * |want|``;
  a NaN matches a NaN at the same place and nothing else, an infinity matches the same infinity;
- integer and bool outputs must be equal (``inf`` when they are not);
- half-precision outputs (named by ``dtypes``) cannot meet float32's tolerance, so their atol and rtol are
  raised to a floor (:data:`HALF_FLOOR`).

``max_abs_diff`` is the largest ``|got - want|`` over the float outputs, counting matched NaNs and equal
infinities as 0 and a NaN or infinity against anything else as ``inf``. Numpy only: no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

# the smallest (atol, rtol) a half-precision output is held to
HALF_FLOOR = {"float16": 2e-3, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Match:
    """What :func:`compare` found: ``ok`` (every output within tolerance) and the worst absolute difference."""

    ok: bool
    max_abs_diff: float


def tolerance(dtype: str, atol: float, rtol: float) -> tuple[float, float]:
    """``(atol, rtol)`` for an output of ``dtype`` (a torch or numpy dtype name): half precision's floor."""
    floor = HALF_FLOOR.get(str(dtype).removeprefix("torch."), 0.0)
    return max(atol, floor), max(rtol, floor)


def compare(got: Sequence[ArrayLike], want: Sequence[ArrayLike], *, atol: float, rtol: float,
            dtypes: Sequence[str] | None = None) -> Match:
    """Compare output tuples ``got`` against the reference ``want`` by the rule above. ``dtypes`` names each
    reference output's original dtype when it was widened for numpy (bfloat16 stored as float32)."""
    if len(got) != len(want):
        return Match(False, float("inf"))
    ok, worst = True, 0.0
    for i, (g_raw, w_raw) in enumerate(zip(got, want)):
        g, w = np.asarray(g_raw), np.asarray(w_raw)
        if g.shape != w.shape:
            return Match(False, float("inf"))
        if w.dtype.kind not in "fc" and g.dtype.kind not in "fc":
            if not np.array_equal(g, w):
                return Match(False, float("inf"))
            continue
        a, r = tolerance(dtypes[i] if dtypes else w.dtype.name, atol, rtol)
        wide = np.complex128 if "c" in g.dtype.kind + w.dtype.kind else np.float64
        g64, w64 = g.astype(wide), w.astype(wide)
        worst = max(worst, _max_abs_diff(g64, w64))
        ok = ok and bool(np.allclose(g64, w64, atol=a, rtol=r, equal_nan=True))
    return Match(ok, worst)


def _max_abs_diff(g: np.ndarray, w: np.ndarray) -> float:
    if not g.size:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(g - w)
    same = (g == w) | (np.isnan(g) & np.isnan(w))  # equal infinities, NaN against NaN
    d = np.where(same, 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)  # a NaN or infinity against anything else
    return float(d.max())
