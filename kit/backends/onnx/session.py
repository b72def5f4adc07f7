"""Serving a version with onnxruntime: the session and a numpy-in, numpy-out callable over it.

Nothing here imports torch (a worker that serves with onnxruntime never does); onnxruntime itself is
imported when a session is made. :func:`load_onnx` is what ``Registry.load(..., backend="onnxruntime")``
calls once the version's files are verified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from kit.backends.checks import Limits
from kit.backends.onnx.scan import check_onnx
from kit.errors import ServingError

if TYPE_CHECKING:
    import numpy as np
    from onnxruntime import InferenceSession

    from kit.signature import Signature

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install kit[onnx]"


def _onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ServingError(f"Serving with backend 'onnxruntime' needs onnxruntime, which is not installed here "
                           f"({exc}). Run `{INSTALL_HINT}` (onnxruntime-gpu for CUDA) or serve with backend "
                           "'torch'.") from exc
    return onnxruntime


def providers(device: str) -> list[str | tuple[str, dict[str, int]]]:
    """onnxruntime execution providers for ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ServingError(f"device {device!r} is not cpu, cuda or cuda:N.")
        have = _onnxruntime().get_available_providers()
        if "CUDAExecutionProvider" not in have:
            raise ServingError(
                f"device {device!r} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime has only "
                f"{', '.join(have)}. Install onnxruntime-gpu (same version) instead of onnxruntime, or serve "
                "on device 'cpu'.")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise ServingError(f"device {device!r} is not cpu, cuda or cuda:N.")


def session(path: Path, *, threads: int = 0, device: str = "cpu") -> InferenceSession:
    """An ``InferenceSession`` over ``path``: ``threads`` intra-op threads (0: onnxruntime's default), one
    inter-op thread, sequential execution, every graph optimisation."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))
    except ServingError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types; translate at the boundary
        raise ServingError(f"onnxruntime could not open {path}: {type(exc).__name__}: {exc}. Register the model "
                           "again, or serve it with backend 'torch'.") from exc


class OrtModule:
    """Runs ``model.onnx``: ``module(*arrays)`` takes numpy arrays in signature input order and returns a
    tuple of numpy arrays in signature output order. Inputs are checked against the signature (count,
    dtype, rank, static dims, named dim ranges) and refused with ``ValueError`` naming what was expected."""

    backend = "onnxruntime"

    def __init__(self, sess: InferenceSession, signature: Signature):
        import numpy as np

        self.session = sess
        self.signature = signature
        self._in_names = [s.name for s in signature.inputs]
        self._out_names = [s.name for s in signature.outputs]
        self._dtypes = [np.dtype(s.dtype) for s in signature.inputs]
        have = [i.name for i in sess.get_inputs()]
        if have != self._in_names:
            raise ServingError(f"model.onnx takes inputs {have}, but the signature names {self._in_names}. "
                               "Register the model again.")

    def _check(self, arrays: Sequence[np.ndarray]) -> None:
        if len(arrays) != len(self._in_names):
            raise ValueError(f"expected {len(self._in_names)} input array(s) ({', '.join(self._in_names)}), "
                             f"got {len(arrays)}")
        for spec, dtype, x in zip(self.signature.inputs, self._dtypes, arrays):
            shape = getattr(x, "shape", None)
            if shape is None or getattr(x, "dtype", None) != dtype or len(shape) != len(spec.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)):
                got = f"{getattr(x, 'dtype', type(x).__name__)}{list(shape) if shape is not None else ''}"
                raise ValueError(f"input {spec.name!r} must be {spec.dtype}[{', '.join(map(str, spec.shape))}], "
                                 f"got {got}")
        self.signature.dim_values([x.shape for x in arrays])

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        self._check(arrays)
        return tuple(self.session.run(self._out_names, dict(zip(self._in_names, arrays))))


def load_onnx(path: Path, signature: Signature, limits: Limits, *, threads: int = 0, device: str = "cpu") -> OrtModule:
    """Check ``model.onnx`` (:func:`kit.backends.onnx.scan.check_onnx`: no file outside the version folder, bounded
    size), then open it with onnxruntime."""
    check_onnx(path, limits)
    return OrtModule(session(path, threads=threads, device=device), signature)

