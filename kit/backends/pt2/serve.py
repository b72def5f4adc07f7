"""The ``"torch"`` backend: a version's ``model.pt2`` loaded for inference, and its serving forward.

``load_version`` is ``Registry.load``'s torch half (the files are verified and in the local cache when it
runs); ``forward`` wraps the loaded program numpy in, numpy out: arrays become tensors with
``torch.from_numpy`` (no copy unless read-only: torch needs writeable memory) inside
``torch.inference_mode``, outputs come back with ``.numpy()`` (``.cpu()`` first on CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kit.backends.checks import Limits
from kit.errors import ServingError

if TYPE_CHECKING:
    from kit.backends.serving import Forward
    from kit.registry.loaded import LoadedModel
    from kit.registry.records import ModelVersion
    from kit.signature import Signature


def resolve_device(device: str) -> str:
    """The torch device for models. Only ever called in a worker (after fork), never in the master."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ServingError(
            f"service.toml asks for device {device!r} but torch {torch.__version__} sees no CUDA GPU "
            f"(torch.cuda.is_available() is False; built for CUDA {torch.version.cuda}). Run on a GPU "
            "machine with a CUDA build of torch, or set [service] device = \"cpu\"."
        )
    return device


def load_version(mv: ModelVersion, files: Path, signature: Signature, limits: Limits, *, drift: Any,
                 signed_by: str | None, device: str = "cpu", threads: int = 0) -> LoadedModel:
    """The verified version in ``files`` as a :class:`~kit.registry.loaded.LoadedModel` over its exported
    program (tensors in and out), moved with its stored example to ``device``. ``threads`` is torch's
    process-wide setting, not a per-model one: unused here."""
    from kit.backends.pt2.load import load_program
    from kit.capture import load_examples
    from kit.registry.loaded import LoadedModel
    from kit.version_files import EXAMPLE_FILE, MODEL_FILE

    module = load_program(files / MODEL_FILE, limits)  # the archive is checked first: no pickle, no code
    name_dims = getattr(module, "name_dims", None)  # ExportedForward: dim names in its errors
    if callable(name_dims):
        name_dims(signature)
    ins, outs = load_examples(files / EXAMPLE_FILE, limits)
    if device != "cpu":  # the module and the stored example together, so check_reference runs there
        module, ins = module.to(device), tuple(t.to(device) for t in ins)
    return LoadedModel(mv, module, signature, ins, outs, drift, signed_by, "torch", files)


def forward(loaded: LoadedModel, device: str) -> Forward:
    """The serving forward of a loaded version (:func:`torch_forward` over its module)."""
    return torch_forward(loaded.module, device, loaded.signature)


def torch_forward(module: torch.nn.Module, device: str, sig: Signature) -> Forward:
    """numpy in, numpy out around the exported program; a dict output becomes its values in signature order."""
    from kit.signature import flatten_outputs

    names = [s.name for s in sig.outputs]
    casts = input_casts(sig)
    cast_any = any(c is not None for c in casts)
    # Call forward directly, skipping nn.Module.__call__'s hook machinery. For ExportedForward (what
    # Registry.load returns for inference programs) forward still checks rank, static dims and dtype in a
    # few microseconds; kit.serving.protocol has checked them against the signature already.
    call = getattr(module, "forward", module)
    dev = torch.device(device)
    on_cpu = device == "cpu"

    def tensors(inputs: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        # torch.from_numpy shares the array's memory and needs it writeable (a binary v2 body is not)
        ts = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in inputs]
        if cast_any:
            ts = [t if c is None else t.to(c) for t, c in zip(ts, casts)]
        return ts if on_cpu else [t.to(dev, non_blocking=True) for t in ts]

    def run(inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = call(*tensors(inputs))
            return tuple(_numpy_out(o, on_cpu) for o in flatten_outputs(out, names))
    return run


def input_casts(sig: Signature) -> tuple[torch.dtype | None, ...]:
    """Per input, the torch dtype to cast it to, for a dtype numpy lacks (bfloat16: it arrives as float32,
    kit.serving.protocol.np_dtype, and the gate makes its inputs with numpy); None where none is needed."""
    return tuple(None if _numpy_has(s.dtype) else getattr(torch, s.dtype, None) for s in sig.inputs)


def preload() -> None:
    """What a gunicorn master imports for torch workers: torch and what loading a version imports (the
    graph builder, never torch's deserializer). Imports only: no threads, no CUDA, no model."""
    import kit.backends.pt2.load  # noqa: F401
    import kit.capture  # noqa: F401


def _numpy_has(dtype: str) -> bool:
    """Whether numpy itself names ``dtype`` (not bfloat16, nor a name ml_dtypes taught it)."""
    try:
        return np.dtype(dtype).type.__module__ == "numpy"
    except TypeError:
        return False


def _numpy_out(t: torch.Tensor, on_cpu: bool) -> np.ndarray:
    if not on_cpu:
        t = t.cpu()
    try:
        return t.numpy()
    except TypeError:  # bfloat16 and friends: numpy has no such dtype
        return t.float().numpy()
