"""Running a captured ``torch.export`` program: :class:`ExportedForward`, the exported graph called with its
lifted parameters bound once, and :func:`exported_forward` for an ``ExportedProgram`` in memory.

:mod:`kit.backends.pt2.fx_build` builds an :class:`ExportedForward` from a checked archive and
:mod:`kit.backends.pt2.load` loads one from a file; this module imports neither (the builder imports it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.utils._pytree import TreeSpec

    from kit.signature import Signature

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The program needs the general path (``ExportedProgram.module()`` or torch's deserializer)."""


@dataclass(frozen=True)
class UserInput:
    """What a user input must be: rank, static dims (None: dynamic), dtype, dynamic dims' symbols."""

    name: str
    dims: tuple[int | None, ...]
    dtype: torch.dtype
    symbols: tuple[tuple[int, str, int, int], ...] = ()  # (dim, symbol, min, max)


class ExportedForward(torch.nn.Module):
    """Runs an exported program's graph directly, its lifted parameters bound once.

    ``ExportedProgram.module()`` re-flattens the inputs with pytree, runs a Python guard function and looks
    up every parameter by attribute on each call: about 60 us per call on a small MLP, more than the
    matrix work itself. This calls the same graph with the same tensors and checks what the guards
    checked (input count, rank, static dims, dtype, dynamic dims' ranges) in a few microseconds, raising
    ``ValueError`` naming the expected shape. Parameters, buffers and constants are buffers of this
    module, so ``.to(device)`` moves them.
    """

    def __init__(self, graph: torch.fx.GraphModule, lifted: list[torch.Tensor], inputs: list[UserInput],
                 out_spec: TreeSpec | None):
        super().__init__()
        for i, t in enumerate(lifted):
            self.register_buffer(f"lifted_{i}", t.detach(), persistent=False)
        self.graph = graph
        self._out_spec = out_spec
        self._names = [u.name for u in inputs]
        self._expect = [(len(u.dims), u.dims, u.dtype) for u in inputs]
        # dynamic dims: (input, dim, symbol, min, max); inputs sharing a symbol must agree on its value
        self._dynamic = [(k, d, sym, lo, hi) for k, u in enumerate(inputs) for d, sym, lo, hi in u.symbols]
        self._labels = [[str(s) if s is not None else "batch" if d == 0 else f"d{d}" for d, s in enumerate(u.dims)]
                        for u in inputs]

    @classmethod
    def from_program(cls, program: torch.export.ExportedProgram) -> ExportedForward:
        """From an in-memory program (capture); raises :class:`Unsupported` when it needs ``.module()``."""
        from torch.export.graph_signature import InputKind, OutputKind

        sig = program.graph_signature
        specs = list(sig.input_specs)
        kinds = [s.kind for s in specs]
        n_user = kinds.count(InputKind.USER_INPUT)
        if kinds[len(kinds) - n_user:] != [InputKind.USER_INPUT] * n_user:
            raise Unsupported("user inputs are not the last placeholders")
        if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
            raise Unsupported("the program mutates buffers or returns more than user outputs")
        lifted = []
        for spec in specs[: len(specs) - n_user]:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
                t = program.state_dict[spec.target]
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR) and spec.target in program.constants:
                t = program.constants[spec.target]
            else:
                raise Unsupported(f"input {spec.target!r} of kind {spec.kind.name}")
            if not isinstance(t, torch.Tensor):
                raise Unsupported(f"input {spec.target!r} is not a tensor")
            lifted.append(t)
        placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"][len(specs) - n_user:]
        return cls(program.graph_module, lifted, [_user_input(program, n) for n in placeholders],
                   program.call_spec.out_spec)

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> None:
        if len(inputs) != len(self._expect):
            raise ValueError(f"expected {len(self._expect)} input tensor(s) ({', '.join(self._names)}), got {len(inputs)}")
        for name, x, (rank, dims, dtype) in zip(self._names, inputs, self._expect):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"input {name!r} must be a tensor, got {type(x).__name__}")
            if x.dim() != rank or any(d is not None and d != s for d, s in zip(dims, x.shape)) or x.dtype != dtype:
                want = ", ".join(self._labels[self._names.index(name)])
                raise ValueError(f"input {name!r} must be {str(dtype).removeprefix('torch.')}[{want}], "
                                 f"got {str(x.dtype).removeprefix('torch.')}{list(x.shape)}")
        if self._dynamic:
            self._check_dynamic(inputs)

    def _check_dynamic(self, inputs: tuple[torch.Tensor, ...]) -> None:
        seen: dict[str, tuple[int, int, int]] = {}
        for k, d, sym, lo, hi in self._dynamic:
            v = int(inputs[k].shape[d])
            label = self._labels[k][d]
            if not lo <= v <= hi:
                raise ValueError(f"input {self._names[k]!r} dim {d} ({label}) is {v}; the exported program "
                                 f"accepts {lo} to {hi}")
            first = seen.setdefault(sym, (v, k, d))
            if first[0] != v:
                raise ValueError(f"inputs disagree on {label}: {self._names[first[1]]!r} dim {first[2]} is "
                                 f"{first[0]} but {self._names[k]!r} dim {d} is {v}")

    def name_dims(self, signature: Signature) -> None:
        """Use the signature's dim names (``seq``) in error messages instead of placeholders."""
        for k, spec in enumerate(getattr(signature, "inputs", ())[: len(self._labels)]):
            if len(spec.shape) == len(self._labels[k]):
                self._labels[k] = [str(s) for s in spec.shape]

    def forward(self, *inputs: torch.Tensor) -> Any:
        self._check(inputs)
        outs = self.graph.forward(*self._buffers.values(), *inputs)
        if self._out_spec is None:
            return outs
        from torch.utils import _pytree

        return _pytree.tree_unflatten(list(outs), self._out_spec)


def _user_input(program: torch.export.ExportedProgram, node: torch.fx.Node) -> UserInput:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported("a user input has no recorded example value")
    symbols: list[tuple[int, str, int, int]] = []
    for d, size in enumerate(val.shape):
        if not isinstance(size, int):
            lo, hi = _symbol_range(program, size)
            symbols.append((d, str(size), lo, hi))
    dims = tuple(d if isinstance(d, int) else None for d in val.shape)
    return UserInput(node.name, dims, val.dtype, tuple(symbols))


def _symbol_range(program: torch.export.ExportedProgram, size: torch.SymInt) -> tuple[int, int]:
    """The inclusive range torch.export recorded for a symbolic input dim (unbounded ends: 0 and 2**62)."""
    rng = program.range_constraints.get(getattr(getattr(size, "node", None), "expr", None))
    if rng is None:
        return 0, 2**62
    lo, hi = rng.lower, rng.upper
    return (int(lo) if lo.is_finite else 0), (int(hi) if hi.is_finite else 2**62)


def exported_forward(program: torch.export.ExportedProgram) -> torch.nn.Module:
    """The fastest faithful callable for ``program``: :class:`ExportedForward` when the program's
    signature allows it (parameters, buffers and constants in, user outputs out), else ``program.module()``.
    """
    try:
        return ExportedForward.from_program(program)
    except Unsupported as why:
        log.debug("running %s through ExportedProgram.module(): %s", type(program).__name__, why)
        return program.module()
