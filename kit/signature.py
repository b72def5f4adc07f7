"""What a captured model takes and returns: :class:`Signature`, :class:`TensorSpec` and named dims.

A shape holds ints (static dims) and dim names: ``"batch"`` is dim 0 of every input when the batch is
dynamic; any other name (``"seq"``) is a dynamic dim the user asked for. ``Signature.dims`` gives each
name its inclusive ``(min, max)`` range, so a server can refuse a value before running the model. Output
shapes may also hold an expression of dim names (``"seq - 1"``). This module imports neither torch nor
numpy: light processes (the CLI, the gate's parent) read signatures too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kit._types import JSONObject
from kit.errors import CaptureError

BATCH = "batch"
DEFAULT_MAX_BATCH = 4096
DEFAULT_MAX_DIM = 4096
OUTPUT_KINDS = ("tensor", "tuple", "dict")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``shape`` holds ints and dim names (``"batch"``, ``"seq"``, ...)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> JSONObject:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: JSONObject) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(s) for s in self.shape)}]"

    @cached_property
    def _named(self) -> tuple[tuple[int, str], ...]:
        return tuple((i, d) for i, d in enumerate(self.shape) if isinstance(d, str) and _DIM_NAME.fullmatch(d))

    def named_dims(self) -> tuple[tuple[int, str], ...]:
        """(index, name) of every dynamic dim (expressions of names excluded); computed once."""
        return self._named


@dataclass(frozen=True)
class Signature:
    """Inputs, outputs and the ranges of the named dims.

    ``output_kind`` is what the model returns: ``"tensor"``, ``"tuple"`` or ``"dict"`` (then the output
    names are the dict's keys, in order).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = DEFAULT_MAX_BATCH
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    output_kind: str = "tuple"

    def to_dict(self) -> JSONObject:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "max_batch": self.max_batch,
            "dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.dims.items()},
            "output_kind": self.output_kind,
        }

    @classmethod
    def from_dict(cls, d: JSONObject) -> Signature:
        """Read a signature; one written before named dims gets ``{"batch": (1, max_batch)}``."""
        inputs = tuple(TensorSpec.from_dict(x) for x in d["inputs"])
        max_batch = int(d.get("max_batch", DEFAULT_MAX_BATCH))
        raw = d.get("dims")
        if isinstance(raw, dict):
            dims = {str(k): (int(v["min"]), int(v["max"])) for k, v in raw.items()}
        else:
            dims = {BATCH: (1, max_batch)} if any(BATCH in s.shape for s in inputs) else {}
        return cls(
            inputs=inputs,
            outputs=tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
            max_batch=max_batch,
            dims=dims,
            output_kind=str(d.get("output_kind", "tuple")),
        )

    def describe(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        ranges = [f"{k} {lo}..{hi}" for k, (lo, hi) in self.dims.items() if k != BATCH]
        return f"({ins}) -> ({outs})" + (f" with {', '.join(ranges)}" if ranges else "")

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dim_range(self, name: str) -> tuple[int, int]:
        if name in self.dims:
            return self.dims[name]
        return (1, self.max_batch) if name == BATCH else (0, 2**62)

    def dim_values(self, shapes: Sequence[Sequence[int]]) -> dict[str, int]:
        """The value of every named dim in ``shapes`` (one per input, ranks already checked).

        Raises ``ValueError`` naming the dim, the inputs and the allowed range when inputs disagree on a
        dim or a value lies outside its range.
        """
        seen: dict[str, tuple[int, str]] = {}
        for spec, shape in zip(self.inputs, shapes):
            for i, name in spec.named_dims():
                value = int(shape[i])
                where = f"{spec.name!r} dim {i}"
                if name in seen and seen[name][0] != value:
                    raise ValueError(f"Inputs disagree on {name}: {seen[name][1]} is {seen[name][0]} but "
                                     f"{where} is {value}; they must be equal.")
                seen.setdefault(name, (value, where))
                lo, hi = self.dim_range(name)
                if not lo <= value <= hi:
                    if name == BATCH:
                        raise ValueError(f"Input {spec.name!r} has {value} rows; send {lo} to {hi} rows per request.")
                    raise ValueError(f"Input {where} ({name}) is {value}; this model accepts {name} from {lo} "
                                     f"to {hi}.")
        return {k: v for k, (v, _) in seen.items()}


def flatten_outputs(out: object, names: Sequence[str] | None = None) -> tuple[Any, ...]:
    """A model's output as a tuple of tensors: a tensor, a tuple/list, or a dict (values in ``names``
    order when given, else the dict's own order)."""
    if isinstance(out, Mapping):
        keys = list(names) if names is not None and set(names) == set(out) else list(out)
        return tuple(out[k] for k in keys)
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


def normalize_dynamic(dynamic: Mapping[Any, Mapping[int, str]] | None, input_names: Sequence[str],
                      ranks: Sequence[int], *, dynamic_batch: bool) -> dict[int, dict[int, str]]:
    """``{"ids": {1: "seq"}}`` (names or positions as keys) -> ``{input index: {dim index: dim name}}``,
    checked: known inputs, dims inside the rank, not dim 0 of a dynamic batch, valid names."""
    out: dict[int, dict[int, str]] = {}
    for key, dims in (dynamic or {}).items():
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(input_names):
            idx = key
        elif key in input_names:
            idx = list(input_names).index(key)
        else:
            raise CaptureError(f"dynamic names input {key!r}, but the model's inputs are {list(input_names)}.")
        if not isinstance(dims, Mapping):
            raise CaptureError(f"dynamic[{key!r}] must map dim index to dim name, e.g. {{1: 'seq'}}; got {dims!r}.")
        for d, name in dims.items():
            rank = ranks[idx]
            if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
                raise CaptureError(f"dynamic[{key!r}] names dim {d!r}, but input {input_names[idx]!r} has "
                                   f"{rank} dims (0..{rank - 1}).")
            d %= rank
            if not isinstance(name, str) or not _DIM_NAME.fullmatch(name) or name == BATCH:
                raise CaptureError(f"Dim name {name!r} for {input_names[idx]!r} dim {d} must be an identifier "
                                   "other than 'batch' (e.g. 'seq').")
            if d == 0 and dynamic_batch:
                raise CaptureError(f"Dim 0 of {input_names[idx]!r} is the dynamic batch already; name other dims "
                                   "(or pass dynamic_batch=False to name dim 0 yourself).")
            out.setdefault(idx, {})[d] = name
    return out


def parse_dynamic(items: Sequence[str]) -> tuple[dict[str, dict[int, str]], dict[str, tuple[int, int]]]:
    """``["ids:1=seq", "mask:1=seq:2..512"]`` -> (dynamic, dims): what ``--dynamic`` takes in every shell.

    Each item is ``INPUT:DIM=NAME`` with an optional ``:MIN..MAX`` range for the dim.
    """
    dynamic: dict[str, dict[int, str]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    pattern = re.compile(r"([^:=\s]+):(-?\d+)=([A-Za-z_][A-Za-z0-9_]*)(?::(\d+)\.\.(\d+))?")
    for item in items:
        m = pattern.fullmatch(item.strip())
        if m is None:
            raise CaptureError(f"Dynamic dim {item!r} is not INPUT:DIM=NAME[:MIN..MAX] (e.g. ids:1=seq or "
                               "ids:1=seq:2..512).")
        inp, dim, name, lo, hi = m.groups()
        dynamic.setdefault(inp, {})[int(dim)] = name
        if lo is not None and hi is not None:
            rng = (int(lo), int(hi))
            if ranges.get(name, rng) != rng:
                raise CaptureError(f"The dynamic dims give {name} two ranges: {ranges[name]} and {rng}.")
            ranges[name] = rng
    return dynamic, ranges
