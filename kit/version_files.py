"""The files of a registered version and the torch-free reading of its example.

A version folder holds ``model.pt2`` (the torch.export program), ``example.npz`` (example inputs and the
eager reference outputs), ``model.onnx`` when capture could export ONNX (``model.onnx.data`` beside it
when its weights are 2 GB or more) and ``meta.json``. This module imports neither torch nor onnxruntime:
a worker serving with onnxruntime reads the example through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.backends.checks import DEFAULT_LIMITS, Limits, check_npz

MODEL_FILE = "model.pt2"
EXAMPLE_FILE = "example.npz"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the one external-data location a model.onnx may name
BACKENDS = ("torch", "onnxruntime")


def check_backend(backend: Any) -> str:
    """``backend`` if it is one Kit serves with, else ``ValueError`` naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}.")
    return str(backend)


def load_example_arrays(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example inputs and reference outputs as numpy arrays: ``.npy`` members only, no object arrays,
    bounded sizes (:func:`kit.backends.checks.check_npz` first)."""
    import numpy as np

    check_npz(Path(path), limits)
    with np.load(Path(path), allow_pickle=False) as z:
        ins = sorted((k for k in z.files if k.startswith("input_")), key=lambda k: int(k.split("_")[1]))
        outs = sorted((k for k in z.files if k.startswith("output_")), key=lambda k: int(k.split("_")[1]))
        return tuple(z[k].copy() for k in ins), tuple(z[k].copy() for k in outs)
