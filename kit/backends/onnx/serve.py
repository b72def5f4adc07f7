"""The ``"onnxruntime"`` backend: a version's ``model.onnx`` loaded for inference, and its serving forward.

``load_version`` is ``Registry.load``'s onnxruntime half: the file is scanned (:mod:`kit.backends.onnx.scan`),
a session opened (:mod:`kit.backends.onnx.session`) and the example read as numpy arrays. ``forward`` is
the session's ``run``, fed the checked arrays as they are. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit.backends.checks import Limits

if TYPE_CHECKING:
    import numpy as np

    from kit.backends.serving import Forward
    from kit.registry.loaded import LoadedModel
    from kit.registry.records import ModelVersion
    from kit.signature import Signature


def resolve_device(device: str) -> str:
    """onnxruntime picks its execution provider from the device when the session is made."""
    return device


def load_version(mv: ModelVersion, files: Path, signature: Signature, limits: Limits, *, drift: Any,
                 signed_by: str | None, device: str = "cpu", threads: int = 0) -> LoadedModel:
    """The verified version in ``files`` as a :class:`~kit.registry.loaded.LoadedModel` over an onnxruntime
    session (numpy in, a tuple of numpy out), ``threads`` intra-op threads (0: onnxruntime's default)."""
    from kit.backends.onnx.session import load_onnx
    from kit.registry.loaded import LoadedModel
    from kit.version_files import EXAMPLE_FILE, ONNX_FILE, load_example_arrays

    module = load_onnx(files / ONNX_FILE, signature, limits, threads=threads, device=device)
    ins, outs = load_example_arrays(files / EXAMPLE_FILE, limits)
    return LoadedModel(mv, module, signature, ins, outs, drift, signed_by, "onnxruntime", files)


def forward(loaded: LoadedModel, device: str) -> Forward:
    """``session.run`` with the signature's names, fed the arrays as they are: onnxruntime only reads them
    (a read-only view of a v2 binary body is fine). The OrtModule's own per-call checks are skipped, as
    the torch path skips nn.Module hooks: kit.serving.protocol has checked every input against the signature."""
    run = loaded.module.session.run
    ins = [s.name for s in loaded.signature.inputs]
    outs = [s.name for s in loaded.signature.outputs]

    def call(inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return tuple(run(outs, dict(zip(ins, inputs))))
    return call


def preload() -> None:
    """What an onnxruntime worker's master imports, torch excluded: importing onnxruntime makes no session
    and no thread pool (each worker's session makes its own after fork)."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    import kit.backends.onnx.session  # noqa: F401
