"""The files of a registered version and the torch-free reading of its example.

A version folder holds ``model.pt2`` (the torch.export program), ``example.npz`` (example inputs and the
eager reference outputs), ``model.onnx`` when capture could export ONNX (``model.onnx.data`` beside it
when its weights are 2 GB or more) and ``meta.json``. This module imports neither torch nor onnxruntime:
a worker serving with onnxruntime reads the example through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kit import backends
from kit.backends.checks import DEFAULT_LIMITS, Limits, check_npz

if TYPE_CHECKING:
    import numpy as np

MODEL_FILE = backends.TORCH.artifact  # model.pt2
EXAMPLE_FILE = "example.npz"
ONNX_FILE = backends.ONNXRUNTIME.artifact  # model.onnx
ONNX_DATA_FILE = backends.ONNXRUNTIME.companions[0]  # model.onnx.data: the one external-data location a model.onnx may name
BACKENDS = backends.names()


def check_backend(backend: object) -> str:
    """``backend`` if it is a row of :data:`kit.backends.BACKENDS`, else ``ConfigError`` (a ``ValueError``)
    naming the choices."""
    return backends.get(backend).name


BF16_SUFFIX = "__bfloat16"  # numpy has no bfloat16: such a member holds the tensor's bits as uint16


def example_key(kind: str, index: int, dtype_name: str) -> str:
    """The member name of input/output ``index`` in example.npz (``input_0``, ``output_1__bfloat16``)."""
    return f"{kind}_{index}" + (BF16_SUFFIX if dtype_name == "bfloat16" else "")


def load_example_members(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """The example's ``(member name, array)`` pairs, inputs and outputs in order, from one checked read:
    ``.npy`` members only, no object arrays, bounded sizes (:func:`kit.backends.checks.check_npz` first)."""
    import numpy as np

    check_npz(Path(path), limits)
    with np.load(Path(path), allow_pickle=False) as z:
        members = {k: z[k].copy() for k in z.files}
    out: dict[str, list[tuple[str, np.ndarray]]] = {"input": [], "output": []}
    for kind in out:
        keys = [k for k in members if k.startswith(kind + "_")]
        for k in sorted(keys, key=lambda k: int(k.split("_")[1])):
            if k.endswith(BF16_SUFFIX) and members[k].dtype != np.uint16:
                raise ValueError(f"{path}: {k} must hold uint16 bits, holds {members[k].dtype}.")
            out[kind].append((k, members[k]))
    return out["input"], out["output"]


def widen(key: str, arr: np.ndarray) -> np.ndarray:
    """A member as numpy can compute with: bfloat16 bits become the float32 of the same value (exact)."""
    import numpy as np

    return (arr.astype(np.uint32) << 16).view(np.float32) if key.endswith(BF16_SUFFIX) else arr


def load_example_arrays(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Example inputs and reference outputs as numpy arrays (bfloat16 widened to float32, exactly)."""
    ins, outs = load_example_members(path, limits)
    return tuple(widen(k, a) for k, a in ins), tuple(widen(k, a) for k, a in outs)
