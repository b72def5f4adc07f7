"""How much a register writes, and the check that it fits before anything is written.

Register writes a version twice at once: ``model.save`` into a private folder of the cache, then a hashed
copy into the registry (``kit.registry.store``). torch's archive writer aborts the whole process on a full
disk (SIGABRT from its destructor: a notebook kernel dies), so the space is checked first, from sizes known
before saving: the weights, the example arrays, the ONNX files and a bound on the program's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from kit._io import ensure_free_space, same_filesystem

if TYPE_CHECKING:
    from kit.capture import CapturedModel

# The program's JSON and the zip's headers: measured ~40 KB for the demo MLP, ~1 KB per graph node for the
# zoo's transformers; 8 KB per node plus 1 MiB bounds them with room to spare.
_PER_NODE = 8 << 10
_FIXED = 1 << 20


def _tensor_bytes(values: Iterable[object]) -> int:
    total = 0
    for t in values:
        nbytes = getattr(t, "nbytes", None)
        if isinstance(nbytes, int):
            total += nbytes
    return total


def saved_bytes(model: CapturedModel) -> int:
    """An upper bound on the bytes ``model.save`` (a :class:`kit.capture.CapturedModel`) writes."""
    program = model.program
    total = _tensor_bytes(program.state_dict.values()) + _tensor_bytes(getattr(program, "constants", {}).values())
    total += _tensor_bytes(model.example_inputs) + _tensor_bytes(model.reference_outputs)
    total += _PER_NODE * len(program.graph.nodes) + _FIXED
    onnx = getattr(model, "onnx", None)
    if onnx is not None and onnx.folder is not None:
        total += sum((Path(onnx.folder) / f).stat().st_size for f in onnx.files)
    return total


def check_register_space(model: CapturedModel, private_root: Path, registry_dir: Path, name: str) -> int:
    """``StorageError`` unless the private save and the registry's copy of ``model`` both fit (twice the
    size where they share a file system: both exist until the copy is done); returns the size."""
    need = saved_bytes(model)
    what = f"a new version of {name!r}"
    if same_filesystem(private_root, registry_dir):
        ensure_free_space(registry_dir, 2 * need, f"{what} (private copy and registry copy)")
        return need
    ensure_free_space(private_root, need, f"{what}'s private copy (the version cache)")
    ensure_free_space(registry_dir, need, f"{what} into the registry")
    return need
