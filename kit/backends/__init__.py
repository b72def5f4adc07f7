"""Model formats and the backends that serve them: one table, one package per format.

A backend is one row of :data:`BACKENDS` and one package beside this module::

    kit/backends/
        checks.py     what opening any version file may cost (Limits), zip reading, example.npz
        serving.py    a version loaded for serving behind one calling convention (numpy in, numpy out)
        pt2/          "torch": model.pt2 (torch.export) -- grammar, archive checks, graph builder, load, serve
        onnx/         "onnxruntime": model.onnx -- export at capture, protobuf scan, session, serve

Each row names its implementation module (``<package>.serve``), which provides the same four functions:
``load_version`` (``Registry.load``'s backend half: verified files in, a ``LoadedModel`` out), ``forward``
(the serving forward: a tuple of numpy arrays in, a tuple of numpy arrays out), ``preload`` (what a
gunicorn master imports before forking, never a model, never CUDA) and ``resolve_device``. A third
backend is one more package with such a module and one more row. This module imports nothing but
:mod:`kit.errors`: naming or checking a backend never imports torch or onnxruntime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from kit.errors import ConfigError

__all__ = ["BACKENDS", "DEFAULT", "ONNXRUNTIME", "TORCH", "Backend", "get", "names"]


@dataclass(frozen=True)
class Backend:
    """One way of serving a version: its name, the files it needs and where its code lives.

    name : what service.toml ``[model] backend``, ``Registry.load(backend=)`` and result.json name.
    artifact : the version file it serves from (required; a version without it cannot use this backend).
    companions : files that may sit beside ``artifact`` and belong to it (ONNX external data).
    runtime : the distribution whose minor version must match the capture's (``kit.env.diff``).
    platform : the Open Inference Protocol v2 metadata ``platform`` (as Triton names it).
    implementation : the module with ``load_version``, ``forward``, ``preload`` and ``resolve_device``.
    export : the capture-side module that writes ``artifact`` beside the program, or None when capture
        itself writes it (``model.pt2`` is the capture).
    extra : the pip extra to install for it (None: kit's base install has it).
    takes : what the loaded module takes and returns: ``"tensors"`` or ``"numpy"``.
    """

    name: str
    artifact: str
    companions: tuple[str, ...]
    runtime: str
    platform: str
    implementation: str
    export: str | None
    extra: str | None
    takes: str

    def module(self) -> ModuleType:
        """The implementation module (imported on first use: torch for ``"torch"``, never for the others)."""
        return importlib.import_module(self.implementation)

    def exporter(self) -> ModuleType | None:
        """The capture-side export module, if this format is exported beside the program."""
        return importlib.import_module(self.export) if self.export else None


TORCH = Backend(name="torch", artifact="model.pt2", companions=(), runtime="torch",
                platform="pytorch_torch_export", implementation="kit.backends.pt2.serve", export=None,
                extra=None, takes="tensors")
ONNXRUNTIME = Backend(name="onnxruntime", artifact="model.onnx", companions=("model.onnx.data",),
                      runtime="onnxruntime", platform="onnxruntime_onnx",
                      implementation="kit.backends.onnx.serve", export="kit.backends.onnx.export",
                      extra="onnx", takes="numpy")

BACKENDS: dict[str, Backend] = {b.name: b for b in (TORCH, ONNXRUNTIME)}
DEFAULT = TORCH.name


def names() -> tuple[str, ...]:
    """Every backend's name, the default first."""
    return tuple(BACKENDS)


def get(name: object) -> Backend:
    """The row named ``name``; :class:`~kit.errors.ConfigError` (a ``ValueError``) naming the choices otherwise."""
    try:
        return BACKENDS[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}.") from None
