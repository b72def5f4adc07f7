"""Turn an ``nn.Module`` and an example input into a portable artifact.

The artifact is a ``torch.export`` program (``.pt2``) with a dynamic batch dimension, plus the example
input and the eager model's output on it (the reference that warm-up and reload checks compare against).
Loading never unpickles arbitrary objects: ``.pt2`` programs and ``weights_only`` state dicts only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kit.artifacts import DEFAULT_LIMITS, Limits, check_npz, inspect_pt2, load_exported_program, save_program
from kit.errors import CaptureError, ParityError, UnsafeArtifactError

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt2"
EXAMPLE_FILE = "example.npz"
BATCH = "batch"
DEFAULT_MAX_BATCH = 4096


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``shape`` holds ints, and the string ``"batch"`` for the dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(s) for s in self.shape)}]"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = DEFAULT_MAX_BATCH

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Signature":
        return cls(
            inputs=tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
            max_batch=int(d.get("max_batch", DEFAULT_MAX_BATCH)),
        )

    def describe(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        return f"({ins}) -> ({outs})"


@dataclass(frozen=True)
class Parity:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    atol: float
    rtol: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "rtol": self.rtol,
        }


@dataclass(frozen=True)
class CapturedModel:
    """An exported program with everything needed to check it later."""

    program: torch.export.ExportedProgram
    signature: Signature
    example_inputs: tuple[torch.Tensor, ...]
    reference_outputs: tuple[torch.Tensor, ...]
    parity: Parity
    seconds: float
    model_class: str
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> list[Path]:
        """Write ``model.pt2`` and ``example.npz`` into ``directory``; returns the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_program(self.program, directory / MODEL_FILE)
        save_examples(directory / EXAMPLE_FILE, self.example_inputs, self.reference_outputs)
        return [directory / MODEL_FILE, directory / EXAMPLE_FILE]


def _as_tuple(x: Any, what: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise CaptureError(
        f"{what} must be a tensor or a tuple of tensors, got {type(x).__name__}. "
        "Wrap dict inputs/outputs in a module that takes and returns tensors."
    )


def _input_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= n:
        return params[:n]
    return [f"input_{i}" for i in range(n)]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _spec(name: str, t: torch.Tensor, dynamic: bool) -> TensorSpec:
    shape: list[int | str] = list(t.shape)
    if dynamic and shape:
        shape[0] = BATCH
    return TensorSpec(name=name, dtype=_dtype_name(t), shape=tuple(shape))


def _resample(inputs: tuple[torch.Tensor, ...], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of ``batch`` rows drawn from the example rows (keeps values realistic for any dtype)."""
    g = torch.Generator().manual_seed(seed)
    n = inputs[0].shape[0]
    idx = torch.randint(0, n, (batch,), generator=g)
    return tuple(t[idx] for t in inputs)


def _run(fn: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return _as_tuple(fn(*inputs), "The model's output")


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float, rtol: float) -> tuple[float, bool]:
    worst, ok = 0.0, True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf"), False
        if x.is_floating_point() or x.is_complex():
            d = (x.double() - y.double()).abs()
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
            ok = ok and bool(torch.allclose(x.double(), y.double(), atol=atol, rtol=rtol, equal_nan=True))
        else:
            eq = bool(torch.equal(x, y))
            worst = max(worst, 0.0 if eq else float("inf"))
            ok = ok and eq
    return worst, ok


_EXPORT_HINTS = (
    "Make control flow independent of tensor values (or use torch.cond), avoid .item()/.tolist()/"
    "numpy calls in forward, pass dynamic_batch=False if the model only works at one batch size, "
    "or try strict=False."
)


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    strict: bool = False,
    check_batch: int | None = None,
) -> CapturedModel:
    """Export ``model`` with ``torch.export`` and check the exported program against eager mode.

    Parameters
    ----------
    model : the module; it is put in eval mode (and left so).
    example_inputs : a tensor or tuple of tensors whose first dimension is the batch.
    dynamic_batch : export the batch dimension as dynamic (default). A batch-1 example would make
        torch.export specialise the batch to 1, so such an example is widened to 2 rows for tracing.
    atol, rtol : parity tolerance between eager and exported outputs.
    check_batch : the second batch size checked for parity (default: example batch + 3).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}.")
    inputs = tuple(t.detach() for t in _as_tuple(example_inputs, "example_inputs"))
    if dynamic_batch:
        if any(t.dim() == 0 for t in inputs):
            raise CaptureError("A dynamic batch needs every example input to have a batch dimension (dim 0).")
        batch = inputs[0].shape[0]
        if any(t.shape[0] != batch for t in inputs):
            raise CaptureError(
                f"Example inputs disagree on the batch size: {[tuple(t.shape) for t in inputs]}. "
                "Every input's first dimension is the batch."
            )
        if batch < 1:
            raise CaptureError("The example batch is empty; give at least one example row.")
    model.eval()
    names = _input_names(model, len(inputs))
    t0 = time.perf_counter()

    trace_inputs = inputs
    if dynamic_batch and inputs[0].shape[0] == 1:
        # torch.export specialises size-1 dims (0/1 specialisation): trace with two rows instead.
        trace_inputs = _resample(inputs, 2)
    dynamic_shapes = None
    if dynamic_batch:
        dim = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: dim} for _ in inputs)
    try:
        with torch.no_grad():
            program = torch.export.export(model, trace_inputs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # torch raises many unrelated types here; translate at the boundary
        reason = str(exc).strip().splitlines()
        first = reason[0] if reason else type(exc).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}. "
            + _EXPORT_HINTS
        ) from exc

    exported = program.module()
    eager_ref = _run(model, inputs)
    sizes = [inputs[0].shape[0]] if inputs[0].dim() else [1]
    checks = [inputs]
    if dynamic_batch:
        b2 = check_batch or inputs[0].shape[0] + 3
        checks.append(_resample(inputs, b2, seed=1))
        sizes.append(b2)
    worst = 0.0
    for size, x in zip(sizes, checks):
        expected = eager_ref if x is inputs else _run(model, x)
        try:
            got = _run(exported, x)
        except Exception as exc:
            raise CaptureError(
                f"The exported program failed on a batch of {size}: {type(exc).__name__}: {exc}. "
                "The model may depend on a fixed batch size; pass dynamic_batch=False if so."
            ) from exc
        diff, ok = _max_diff(expected, got, atol, rtol)
        worst = max(worst, diff)
        if not ok:
            raise ParityError(
                f"Exported and eager outputs differ at batch {size}: max |diff| = {diff:.3g} exceeds "
                f"atol={atol:g} + rtol={rtol:g}·|eager|. Check for randomness or train-mode layers in "
                "forward, or loosen atol/rtol if the difference is expected.",
                max_abs_diff=diff, atol=atol, rtol=rtol, batch_size=size,
            )
    seconds = time.perf_counter() - t0
    signature = Signature(
        inputs=tuple(_spec(n, t, dynamic_batch) for n, t in zip(names, inputs)),
        outputs=tuple(_spec(f"output_{i}", t, dynamic_batch) for i, t in enumerate(eager_ref)),
        max_batch=max_batch if dynamic_batch else int(inputs[0].shape[0]) if inputs[0].dim() else 1,
    )
    log.info("captured %s in %.2fs: %s", type(model).__name__, seconds, signature.describe())
    return CapturedModel(
        program=program,
        signature=signature,
        example_inputs=inputs,
        reference_outputs=eager_ref,
        parity=Parity(tuple(sizes), worst, atol, rtol),
        seconds=seconds,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )


# --------------------------------------------------------------------------- safe loading

def load_program(path: Path, limits: Limits = DEFAULT_LIMITS) -> torch.nn.Module:
    """Load a ``.pt2`` exported program as a callable module. Never unpickles, never runs artifact code.

    :func:`kit.artifacts.inspect_pt2` checks the archive first (``UnsafeArtifactError`` naming the entry);
    the weights are then mapped from the file, shared between processes, never copied per worker.
    """
    return exported_forward(load_exported_program(inspect_pt2(Path(path), limits)))


def exported_forward(program: torch.export.ExportedProgram) -> torch.nn.Module:
    """The fastest faithful callable for ``program``: :class:`ExportedForward` when the program's
    signature allows it (parameters, buffers and constants in, user outputs out), else ``program.module()``.
    """
    try:
        return ExportedForward(program)
    except _Unsupported as why:
        log.debug("running %s through ExportedProgram.module(): %s", type(program).__name__, why)
        return program.module()


class _Unsupported(Exception):
    pass


class ExportedForward(torch.nn.Module):
    """Runs an exported program's graph directly, its lifted parameters bound once.

    ``ExportedProgram.module()`` re-flattens the inputs with pytree, runs a Python guard function and looks
    up every parameter by attribute on each call: about 60 us per call on a small MLP, more than the
    matrix work itself. This calls the same graph with the same tensors and checks what the guards
    checked (input count, rank, static dims, dtype) in a few microseconds, raising ``ValueError`` naming
    the expected shape. Parameters, buffers and constants are buffers of this module, so ``.to(device)``
    moves them.
    """

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        from torch.export.graph_signature import InputKind, OutputKind

        sig = program.graph_signature
        specs = list(sig.input_specs)
        kinds = [s.kind for s in specs]
        n_user = kinds.count(InputKind.USER_INPUT)
        if kinds[len(kinds) - n_user:] != [InputKind.USER_INPUT] * n_user:
            raise _Unsupported("user inputs are not the last placeholders")
        if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
            raise _Unsupported("the program mutates buffers or returns more than user outputs")
        for i, spec in enumerate(specs[: len(specs) - n_user]):
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
                t = program.state_dict[spec.target]
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR) and spec.target in program.constants:
                t = program.constants[spec.target]
            else:
                raise _Unsupported(f"input {spec.target!r} of kind {spec.kind.name}")
            if not isinstance(t, torch.Tensor):
                raise _Unsupported(f"input {spec.target!r} is not a tensor")
            self.register_buffer(f"lifted_{i}", t.detach(), persistent=False)
        placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"][len(specs) - n_user:]
        self._expect: list[tuple[int, tuple[int | None, ...], torch.dtype]] = []
        for node in placeholders:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise _Unsupported("a user input has no recorded example value")
            dims = tuple(d if isinstance(d, int) else None for d in val.shape)
            self._expect.append((len(dims), dims, val.dtype))
        self._names = [n.name for n in placeholders]
        self.graph = program.graph_module
        self._out_spec = program.call_spec.out_spec

    def _check(self, inputs: tuple[Any, ...]) -> None:
        if len(inputs) != len(self._expect):
            raise ValueError(f"expected {len(self._expect)} input tensor(s) ({', '.join(self._names)}), got {len(inputs)}")
        for name, x, (rank, dims, dtype) in zip(self._names, inputs, self._expect):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"input {name!r} must be a tensor, got {type(x).__name__}")
            if x.dim() != rank or any(d is not None and d != s for d, s in zip(dims, x.shape)) or x.dtype != dtype:
                want = ", ".join("batch" if d is None else str(d) for d in dims)
                raise ValueError(f"input {name!r} must be {str(dtype).removeprefix('torch.')}[{want}], "
                                 f"got {str(x.dtype).removeprefix('torch.')}{list(x.shape)}")

    def forward(self, *inputs: Any) -> Any:
        self._check(inputs)
        outs = self.graph.forward(*self._buffers.values(), *inputs)
        if self._out_spec is None:
            return outs
        from torch.utils import _pytree

        return _pytree.tree_unflatten(list(outs), self._out_spec)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``: a pickle that would run code is refused."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends
        raise UnsafeArtifactError(
            f"Refusing to load {path}: it is not a plain tensor state dict ({type(exc).__name__}). "
            "Kit never unpickles arbitrary objects; save weights with torch.save(model.state_dict())."
        ) from exc
    if not isinstance(obj, dict):
        raise UnsafeArtifactError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def save_examples(path: Path, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
    arrays = {f"input_{i}": t.detach().cpu().numpy() for i, t in enumerate(inputs)}
    arrays.update({f"output_{i}": t.detach().cpu().numpy() for i, t in enumerate(outputs)})
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs confuse **arrays with allow_pickle


def load_examples(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Example inputs and reference outputs: ``.npy`` members only, no object arrays, bounded sizes."""
    check_npz(Path(path), limits)
    with np.load(Path(path), allow_pickle=False) as z:
        ins = sorted((k for k in z.files if k.startswith("input_")), key=lambda k: int(k.split("_")[1]))
        outs = sorted((k for k in z.files if k.startswith("output_")), key=lambda k: int(k.split("_")[1]))
        return (
            tuple(torch.from_numpy(z[k].copy()) for k in ins),
            tuple(torch.from_numpy(z[k].copy()) for k in outs),
        )
