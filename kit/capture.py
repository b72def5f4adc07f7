"""Turn an ``nn.Module`` and an example input into a portable artifact.

The artifact is a ``torch.export`` program (``.pt2``) with a dynamic batch dimension (and any other dims
the user names dynamic), plus the example input and the eager model's output on it (the reference that
warm-up and reload checks compare against). Loading never unpickles arbitrary objects: ``.pt2`` programs
and ``weights_only`` state dicts only.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kit._capture_io import export_hint, plain_model, shapes_for, split_inputs
from kit._capture_shapes import (
    EXPORT_HINTS,
    dim_ranges,
    dynamic_shapes,
    example_dims,
    export_reason,
    io_specs,
    resize_dims,
    second_values,
)
from kit._types import JSONObject
from kit.backends.checks import DEFAULT_LIMITS, Limits
from kit.backends.parity import HALF_FLOOR, compare
from kit.backends.pt2.archive import save_program
from kit.backends.pt2.load import load_program
from kit.backends.pt2.program import ExportedForward
from kit.errors import CaptureError, ParityError, UnsafeArtifactError
from kit.progress import Progress, Steps
from kit.registry.loaded import as_numpy
from kit.signature import (
    BATCH,
    DEFAULT_MAX_BATCH,
    Signature,
    TensorSpec,
    flatten_outputs,
    normalize_dynamic,
    parse_dynamic,
)
from kit.version_files import BF16_SUFFIX, EXAMPLE_FILE, MODEL_FILE, example_key, load_example_members

if TYPE_CHECKING:
    from kit.backends.onnx.export import OnnxExport

log = logging.getLogger(__name__)

__all__ = ["BATCH", "DEFAULT_MAX_BATCH", "CapturedModel", "ExportedForward", "Parity", "Signature", "TensorSpec",
           "capture", "flatten_outputs", "load_examples", "load_program", "load_weights", "parse_dynamic"]


@dataclass(frozen=True)
class Parity:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    atol: float
    rtol: float
    dim_values: dict[str, tuple[int, ...]] = field(default_factory=dict)  # named dim -> values checked

    def to_dict(self) -> JSONObject:
        return {
            "batch_sizes": list(self.batch_sizes),
            "dims": {k: list(v) for k, v in self.dim_values.items()},
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
    onnx: OnnxExport | None = None  # model.onnx and meta.json's capture.onnx record
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step (torch.export, parity, onnx)

    def save(self, directory: Path) -> list[Path]:
        """Write ``model.pt2``, ``example.npz`` (and ``model.onnx`` when exported) into ``directory``;
        returns the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_program(self.program, directory / MODEL_FILE)
        save_examples(directory / EXAMPLE_FILE, self.example_inputs, self.reference_outputs)
        onnx_files = self.onnx.save(directory) if self.onnx is not None else []
        return [directory / MODEL_FILE, directory / EXAMPLE_FILE, *onnx_files]


def _output_kind(out: object) -> tuple[str, list[str] | None]:
    """What the model returns ("tensor", "tuple" or "dict") and, for a dict, its keys."""
    if isinstance(out, torch.Tensor):
        return "tensor", None
    if isinstance(out, Mapping) and out and all(isinstance(k, str) and k and isinstance(v, torch.Tensor)
                                                for k, v in out.items()):
        return "dict", list(out)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return "tuple", None
    raise CaptureError(
        f"The model's output must be a tensor, a tuple of tensors or a dict of names to tensors, got "
        f"{type(out).__name__}. Wrap the model in a module that returns one of those."
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


def _resample(inputs: tuple[torch.Tensor, ...], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of ``batch`` rows drawn from the example rows (keeps values realistic for any dtype)."""
    g = torch.Generator().manual_seed(seed)
    n = inputs[0].shape[0]
    idx = torch.randint(0, n, (batch,), generator=g)
    return tuple(t[idx] for t in inputs)


def _run(fn: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str] | None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return flatten_outputs(fn(*inputs), names)


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[object, ...], atol: float, rtol: float) -> tuple[float, bool]:
    """Eager ``a`` against exported ``b`` by the one rule (:func:`kit.backends.parity.compare`)."""
    if not all(isinstance(y, torch.Tensor) for y in b):
        return float("inf"), False
    match = compare([as_numpy(y) for y in b], [as_numpy(x) for x in a], atol=atol, rtol=rtol,
                    dtypes=[_dtype_name(x) for x in a])
    return match.max_abs_diff, match.ok

def _check_batch(inputs: tuple[torch.Tensor, ...]) -> None:
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




def _export(fn: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dyn: dict[int, dict[int, str]],
            values: dict[str, int], ranges: dict[str, tuple[int, int]], dynamic_batch: bool, max_batch: int,
            strict: bool, model_name: str) -> torch.export.ExportedProgram:
    trace_inputs = inputs
    if dynamic_batch and inputs[0].shape[0] == 1:
        # torch.export specialises size-1 dims (0/1 specialisation): trace with two rows instead.
        trace_inputs = _resample(inputs, 2)
    trace_inputs = resize_dims(trace_inputs, dyn, {n: max(v, 2) for n, v in values.items()})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # nn.GRU/nn.LSTM re-assign their flat weights while traced; torch warns, the program is right
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights", category=UserWarning)
            return torch.export.export(fn, trace_inputs, strict=strict,
                                       dynamic_shapes=shapes_for(fn, dynamic_shapes(inputs, dyn, dynamic_batch, max_batch,
                                                                                  ranges)))
    except CaptureError:
        raise
    except Exception as exc:  # torch raises many unrelated types here; translate at the boundary
        hint = export_hint(exc) + EXPORT_HINTS
        if "specialized it to be a constant" in str(exc):
            hint = ("The model fixes that dim to the example's size (recurrent layers such as nn.GRU/nn.LSTM "
                    "do under torch.export): keep it static by leaving it out of dynamic. " + hint)
        elif "must always be equal" in str(exc):
            hint = "Dims the model needs equal must share one name (e.g. ids:1=seq and mask:1=seq). " + hint
        elif "onstraint" in str(exc) and (dyn or dynamic_batch):
            hint = ("A dynamic dim's range admits values the model cannot take: narrow it with "
                    "dims={'NAME': (MIN, MAX)} (or --dynamic INPUT:DIM=NAME:MIN..MAX), or keep the dim static. "
                    + hint)
        raise CaptureError(f"torch.export could not capture {model_name}: {export_reason(exc).rstrip('.')}. "
                           + hint) from exc


def _parity_checks(fn: torch.nn.Module, exported: torch.nn.Module, checks: list[tuple[str, tuple[torch.Tensor, ...]]],
                   eager_ref: tuple[torch.Tensor, ...], out_names: list[str] | None, atol: float,
                   rtol: float) -> tuple[float, list[tuple[str, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]]:
    """Eager against exported on every check input; returns the worst difference and the eager answers."""
    worst = 0.0
    eager_checks = []
    for i, (label, x) in enumerate(checks):
        expected = eager_ref if i == 0 else _run(fn, x, out_names)
        eager_checks.append((label, x, expected))
        try:
            got = _run(exported, x, out_names)
        except Exception as exc:
            raise CaptureError(
                f"The exported program failed at {label}: {type(exc).__name__}: {str(exc)[:300]}. "
                "The model may depend on a fixed size there; pass dynamic_batch=False or leave that dim static."
            ) from exc
        diff, ok = _max_diff(expected, got, atol, rtol)
        worst = max(worst, diff)
        if not ok:
            raise ParityError(
                f"Exported and eager outputs differ at {label}: max |diff| = {diff:.3g} exceeds "
                f"atol={atol:g} + rtol={rtol:g}·|eager| (half precision: at least {HALF_FLOOR['float16']:g} "
                f"for float16, {HALF_FLOOR['bfloat16']:g} for bfloat16). Check for randomness or train-mode "
                "layers in forward, or loosen atol/rtol if the difference is expected.",
                max_abs_diff=diff, atol=atol, rtol=rtol, batch_size=int(x[0].shape[0]) if x[0].dim() else 1,
            )
    return worst, eager_checks


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic: Mapping[Any, Mapping[int, str]] | None = None,
    dims: Mapping[str, tuple[int, int]] | None = None,
    dynamic_batch: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    strict: bool = False,
    check_batch: int | None = None,
    onnx: bool = True,
    progress: Progress = None,
) -> CapturedModel:
    """Export ``model`` with ``torch.export`` and check the exported program against eager mode.

    Parameters
    ----------
    model : the module; it is put in eval mode (and left so).
    example_inputs : a tensor, a tuple of tensors (positional), or a dict of parameter names to tensors
        (passed by keyword; the keys name the inputs), of any dtypes, whose first dimension is the batch.
        A structured output (a Hugging Face ``ModelOutput``, nested tuples) is captured as a dict of names
        to tensors (:mod:`kit._capture_io`).
    dynamic : more dynamic dims, ``{input name or position: {dim index: dim name}}``, e.g.
        ``{"ids": {1: "seq"}, "mask": {1: "seq"}}``; inputs sharing a name must agree on it.
    dims : inclusive ``(min, max)`` per named dim (default ``(1, 4096)``).
    dynamic_batch : export dim 0 as the dynamic batch (default). Size-1 example dims would make
        torch.export specialise them to 1, so such an example is widened to 2 for tracing.
    atol, rtol : parity tolerance between eager and exported outputs (float16/bfloat16 outputs at least
        2e-3/2e-2), checked on the example, a second batch size (``check_batch``, default example batch + 3)
        and a second value of every named dim.
    onnx : also export ``model.onnx`` (:mod:`kit.backends.onnx.export`) and check it with onnxruntime on the same
        inputs; a model ONNX cannot take is still captured (``capture.onnx`` says why).
    progress : where the steps (``torch.export``, ``parity``, ``onnx``) are said (:mod:`kit.progress`): a
        callable taking each begin and end line, None (one line per step on stderr as it ends) or False
        (silent). Their seconds are kept in the result's ``steps`` either way.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}.")
    inputs, keywords = split_inputs(example_inputs)
    if dynamic_batch:
        _check_batch(inputs)
    model.eval()
    names = keywords or _input_names(model, len(inputs))
    dyn = normalize_dynamic(dynamic, names, [t.dim() for t in inputs], dynamic_batch=dynamic_batch)
    values = example_dims(inputs, names, dyn)
    ranges = dim_ranges(values, dims)
    fn = plain_model(model, inputs, keywords)
    steps = Steps.of(progress, f"capture {type(model).__name__}")
    t0 = time.perf_counter()
    with steps.step("torch.export"):
        program = _export(fn, inputs, dyn, values, ranges, dynamic_batch, max_batch, strict, type(model).__name__)
    with steps.step("parity", "exported against eager"):
        with torch.no_grad():
            raw = fn(*inputs)
        kind, out_names = _output_kind(raw)
        eager_ref = flatten_outputs(raw)
        checks, sizes, second = _check_inputs(inputs, dyn, values, ranges, dynamic_batch, check_batch)
        worst, eager_checks = _parity_checks(fn, program.module(), checks, eager_ref, out_names, atol, rtol)
    seconds = time.perf_counter() - t0
    out_labels = out_names or [f"output_{i}" for i in range(len(eager_ref))]
    in_specs, out_specs = io_specs(program, names, inputs, out_labels, eager_ref, dyn, dynamic_batch)
    all_dims = ({BATCH: (1, max_batch)} if dynamic_batch else {}) | ranges
    signature = Signature(
        inputs=in_specs, outputs=out_specs,
        max_batch=max_batch if dynamic_batch else int(inputs[0].shape[0]) if inputs[0].dim() else 1,
        dims=all_dims, output_kind=kind,
    )
    log.info("captured %s in %.2fs: %s", type(model).__name__, seconds, signature.describe())
    parity = Parity(tuple(sizes), worst, atol, rtol, {k: (values[k], second[k]) for k in values})
    from kit.backends.onnx import export as onnx_export

    if onnx:
        with steps.step("onnx", "ONNX export and onnxruntime check"):
            onnx_result = onnx_export.export_onnx(program, eager_checks, names, out_labels, parity.to_dict())
    else:
        onnx_result = onnx_export.not_exported("captured with onnx=False; capture again with onnx=True to serve "
                                               "with onnxruntime")
    return CapturedModel(program=program, signature=signature, example_inputs=inputs, reference_outputs=eager_ref,
                         parity=parity, seconds=seconds, onnx=onnx_result, steps=dict(steps.seconds),
                         model_class=f"{type(model).__module__}.{type(model).__qualname__}")


def _check_inputs(inputs: tuple[torch.Tensor, ...], dyn: dict[int, dict[int, str]], values: dict[str, int],
                  ranges: dict[str, tuple[int, int]], dynamic_batch: bool, check_batch: int | None,
                  ) -> tuple[list[tuple[str, tuple[torch.Tensor, ...]]], list[int], dict[str, int]]:
    """The inputs parity checks the program at (label, inputs): the example, a second batch size and a
    second value of every named dim; the batch sizes checked; the second dim values."""
    checks: list[tuple[str, tuple[torch.Tensor, ...]]] = [(f"batch {inputs[0].shape[0] if inputs[0].dim() else 1}",
                                                          inputs)]
    sizes = [int(inputs[0].shape[0]) if inputs[0].dim() else 1]
    if dynamic_batch:
        b2 = check_batch or inputs[0].shape[0] + 3
        checks.append((f"batch {b2}", _resample(inputs, b2, seed=1)))
        sizes.append(b2)
    second = second_values(values, ranges)
    if second:
        checks.append((", ".join(f"{k} {v}" for k, v in second.items()), resize_dims(inputs, dyn, second)))
    return checks, sizes, second


# --------------------------------------------------------------------------- safe loading

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


def _example_array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def save_examples(path: Path, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
    """example.npz: plain ``.npy`` members; a bfloat16 tensor as its uint16 bits (numpy has no bfloat16)."""
    arrays = {example_key("input", i, _dtype_name(t)): _example_array(t) for i, t in enumerate(inputs)}
    arrays.update({example_key("output", i, _dtype_name(t)): _example_array(t) for i, t in enumerate(outputs)})
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs confuse **arrays with allow_pickle


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _example_tensor(key: str, arr: np.ndarray) -> torch.Tensor:
    if key.endswith(BF16_SUFFIX):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def load_examples(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Example inputs and reference outputs, in their captured dtypes (bfloat16 included):
    ``.npy`` members only, no object arrays, bounded sizes."""
    ins, outs = load_example_members(path, limits)
    return tuple(_example_tensor(k, a) for k, a in ins), tuple(_example_tensor(k, a) for k, a in outs)
