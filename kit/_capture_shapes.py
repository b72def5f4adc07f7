"""torch.export plumbing for :func:`kit.capture.capture`: named dynamic dims, their ranges, the example
resized along them, the exporter's reason for a failure, and input/output specs read from the program's
symbolic shapes (``"seq - 1"`` for an output one shorter than the input)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kit.errors import CaptureError
from kit.signature import BATCH, DEFAULT_MAX_DIM, TensorSpec

log = logging.getLogger("kit.capture")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def resize_dims(inputs: tuple[torch.Tensor, ...], dyn: dict[int, dict[int, str]],
                 values: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
    """``inputs`` with each named dim set to ``values[name]`` by repeating (or cutting) the example along it:
    positions cycle, so ids stay valid ids and masks stay masks."""
    out = list(inputs)
    for i, dims in dyn.items():
        for d, name in dims.items():
            n = out[i].shape[d]
            if values[name] != n:
                out[i] = out[i].index_select(d, torch.arange(values[name]) % n)
    return tuple(out)


EXPORT_HINTS = (
    "Make control flow independent of tensor values (or use torch.cond), avoid .item()/.tolist()/"
    "numpy calls in forward, and pass dynamic_batch=False if the model only works at one batch size "
    "(capture traces with strict=False unless you asked for strict=True)."
)


def export_reason(exc: BaseException) -> str:
    """The exporter's first line, plus the lines that say which constraint failed and how to fix it."""
    lines = [ln.rstrip() for ln in str(exc).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    detail = [ln.strip() for ln in lines[1:] if ln.lstrip().startswith("- ") or "Dim(" in ln][:4]
    return " ".join([f"{type(exc).__name__}: {first}", *detail])


def dim_ranges(values: Mapping[str, int], dims: Mapping[str, tuple[int, int]] | None) -> dict[str, tuple[int, int]]:
    ranges: dict[str, tuple[int, int]] = {}
    unknown = sorted(set(dims or {}) - set(values) - {BATCH})
    if unknown:
        raise CaptureError(f"dims gives ranges for {unknown}, which no input names dynamic (named: {sorted(values)}).")
    for name, v in values.items():
        lo, hi = (dims or {}).get(name, (1, max(DEFAULT_MAX_DIM, v)))
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
            raise CaptureError(f"The range of {name} must be two ints MIN < MAX, got {(lo, hi)!r}; a dim with "
                               "one value is static (leave it out of dynamic).")
        if not lo <= v <= hi:
            raise CaptureError(f"The example has {name} = {v}, outside its range {lo}..{hi}.")
        if hi < 2 and v == 1:
            raise CaptureError(f"{name} needs a range reaching 2 or more to be dynamic.")
        ranges[name] = (lo, hi)
    return ranges


def dynamic_shapes(inputs: tuple[torch.Tensor, ...], dyn: dict[int, dict[int, str]], dynamic_batch: bool,
                    max_batch: int, ranges: Mapping[str, tuple[int, int]]) -> tuple[Any, ...] | None:
    if not dynamic_batch and not dyn:
        return None
    made = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    batch = torch.export.Dim(BATCH, min=1, max=max_batch)
    shapes = []
    for i in range(len(inputs)):
        spec: dict[int, Any] = {0: batch} if dynamic_batch else {}
        spec.update({d: made[name] for d, name in dyn.get(i, {}).items()})
        shapes.append(spec or None)
    return tuple(shapes)


def example_dims(inputs: tuple[torch.Tensor, ...], names: list[str], dyn: dict[int, dict[int, str]]) -> dict[str, int]:
    values: dict[str, int] = {}
    for i, dims in dyn.items():
        for d, name in dims.items():
            v = int(inputs[i].shape[d])
            if values.setdefault(name, v) != v:
                raise CaptureError(f"The example inputs disagree on {name}: {names[i]!r} dim {d} is {v}, "
                                   f"another input has {values[name]}. Inputs sharing a dim name must match.")
    return values


def io_specs(program: torch.export.ExportedProgram, names: list[str], inputs: tuple[torch.Tensor, ...],
              out_names: list[str], outs: tuple[torch.Tensor, ...], dyn: dict[int, dict[int, str]],
              dynamic_batch: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs; output dims come from the program's symbolic shapes (names substituted)."""
    in_specs = []
    for i, (n, t) in enumerate(zip(names, inputs)):
        shape: list[int | str] = list(t.shape)
        if dynamic_batch:
            shape[0] = BATCH
        for d, dim_name in dyn.get(i, {}).items():
            shape[d] = dim_name
        in_specs.append(TensorSpec(n, _dtype_name(t), tuple(shape)))
    try:
        out_shapes = _symbolic_output_shapes(program, in_specs)
    except Exception as exc:  # symbolic metadata is best effort: fall back to the eager shapes
        log.debug("no symbolic output shapes (%s); using eager shapes", exc)
        out_shapes = [tuple([BATCH, *o.shape[1:]] if dynamic_batch and o.dim() else o.shape) for o in outs]
    out_specs = tuple(TensorSpec(n, _dtype_name(o), tuple(s)) for n, o, s in zip(out_names, outs, out_shapes))
    return tuple(in_specs), out_specs


def _symbolic_output_shapes(program: torch.export.ExportedProgram, in_specs: list[TensorSpec]) -> list[tuple[int | str, ...]]:
    import sympy
    from torch.export.graph_signature import OutputKind

    nodes = list(program.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"][-len(in_specs):]
    names: dict[Any, Any] = {}
    for node, spec in zip(placeholders, in_specs):
        for d, label in zip(node.meta["val"].shape, spec.shape):
            if isinstance(d, torch.SymInt) and isinstance(label, str):
                names[d.node.expr] = sympy.Symbol(label)
    outputs = [n for n in nodes if n.op == "output"][0].args[0]
    kinds = [s.kind for s in program.graph_signature.output_specs]
    shapes: list[tuple[int | str, ...]] = []
    for node, kind in zip(outputs, kinds):
        if kind != OutputKind.USER_OUTPUT:
            continue
        shape: list[int | str] = []
        for d in node.meta["val"].shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                expr = d.node.expr
                shape.append(str(names[expr]) if expr in names else str(expr.subs(names)))
        shapes.append(tuple(shape))
    return shapes


def second_values(values: Mapping[str, int], ranges: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Another value of every named dim, inside its range, for the second parity check."""
    second = {}
    for name, v in values.items():
        lo, hi = ranges[name]
        w = min(hi, v + 3)
        second[name] = w if w != v else max(lo, v - 1)
    return second
