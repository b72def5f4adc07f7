"""Build an :class:`~kit.backends.pt2.program.ExportedForward` straight from a checked ``.pt2``'s program JSON.

torch's own deserializer imports ``torch._dynamo`` and sympy (about a second, before a byte of the model
is read), re-creates fake tensors and a shape environment for every node, and builds an
``ExportedProgram`` that serving never uses. Serving needs only the graph, the lifted weights, and what
each user input must be. This module builds exactly that from the JSON that :mod:`kit.backends.pt2.archive` has
already held to its grammar: ATen operator calls with tensor, scalar, list, dtype, layout, device and
symbolic-size arguments, and the Python operators on sizes. Anything else -- control flow (higher-order
operators), custom objects, symbolic outputs it cannot name -- raises :class:`~kit.backends.pt2.program.Unsupported`
(torch's deserializer builds it only when the loader trusts the signer).

No text from the artifact reaches the Python source torch.fx generates: placeholders and nodes are named
by Kit (``input_0``, FX's own names from the resolved operator), the JSON's names are only keys of a dict.
Call targets resolve to an ``OpOverload`` of ``aten``/``prims`` through namespace -> packet -> overload,
or to a fixed table of Python operators that refuse ints outside int64. Sizes a node creates a tensor from
(``full``/``zeros``/``empty``/``new_*``/``arange``/``expand``/``repeat``/``pad``/``upsample``...) are bounded
before allocation: at load when they are constants, by a check node before the operator when they come
from input sizes (:func:`check_size`, a microsecond per such node per call).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch._export.serde import schema

from kit._types import JSONObject
from kit.backends.checks import DEFAULT_LIMITS, Limits, tensor_limit
from kit.backends.pt2.archive import MappedTensors, Pt2Archive
from kit.backends.pt2.dtypes import FORMATS, LAYOUTS, dtype_of, enum_of
from kit.backends.pt2.grammar import (
    DUNDER_PACKETS,
    INT64,
    MATH_FUNCTIONS,
    OP_TARGET,
    PY_OPERATORS,
    SYM_FUNCTIONS,
    is_identifier,
)
from kit.backends.pt2.program import ExportedForward, Unsupported, UserInput
from kit.errors import UnsafeArtifactError

# a size that is one symbol, bare or in sympy's srepr form: Symbol('s81', positive=True, integer=True)
_SYMBOL = re.compile(r"(?:Symbol\(')?(?P<name>[a-z]{1,8}\d{1,9})(?:'(?:, [a-z]+=(?:True|False))*\))?")
_SCALARS = ("as_int", "as_bool", "as_string", "as_ints", "as_bools", "as_strings")


def _float(value: Any) -> float:
    if isinstance(value, str) and value not in ("Infinity", "-Infinity", "NaN"):
        raise Unsupported(f"float {value!r}")
    return float(value)


class Refused(Exception):
    """The program does something Kit never runs (the loader turns it into ``UnsafeArtifactError``)."""


def _too_big(what: str) -> UnsafeArtifactError:
    return UnsafeArtifactError(f"Refusing to run the model: its Python operator {what} makes an integer outside "
                               "int64. Re-capture the model with kit.capture.capture().")


def _kit_mul(a: Any, b: Any) -> Any:
    r = a * b
    if isinstance(r, int) and not -INT64 <= r < INT64:
        raise _too_big(f"mul({a}, {b})")
    return r


def _kit_lshift(a: Any, b: Any) -> Any:
    if b > 62 and a:  # refused before Python builds a b-bit integer (1 << 10**9 is 125 MB)
        raise _too_big(f"lshift({a}, {b})")
    return _kit_mul(a, 1 << b) if b >= 0 else a << b


def _kit_pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 63 and abs(a) > 1:
        raise _too_big(f"pow({a}, {b})")
    return _kit_mul(a ** b, 1)


# Only these can grow an int by more than a bit per node (a chain of squarings doubles its bits each
# time); add/sub add at most one bit, the rest never grow one. Inputs are int64: JSON ints are refused
# outside it at parse, sizes and items of tensors are in it.
_BOUNDED = {"mul": _kit_mul, "lshift": _kit_lshift, "pow": _kit_pow}


def _python_op(name: str) -> Callable[..., Any]:
    return _BOUNDED.get(name) or getattr(operator, name)


_PY_OPS = {name: _python_op(name) for name in PY_OPERATORS}


def resolve_target(text: str) -> Callable[..., Any]:
    """The callable of a call target the grammar allowed: an ``OpOverload`` of an allowed namespace (looked
    up as namespace -> packet -> overload, never an attribute of ``torch.ops`` itself), a Python operator,
    ``math`` function or ``torch.sym_*`` function from a fixed table. Control flow is :class:`Unsupported`."""
    head, _, rest = text.partition(".")
    if head == "_operator" and rest in _PY_OPS:
        return _PY_OPS[rest]
    if head == "math" and rest in MATH_FUNCTIONS:
        return getattr(math, rest)
    if head == "torch" and rest in SYM_FUNCTIONS:
        return getattr(torch, rest)
    if text.startswith("torch.ops.higher_order."):
        raise Unsupported(f"control flow ({text})")
    m = OP_TARGET.fullmatch(text)
    if m is None or not all(is_identifier(m[p]) or m[p].startswith("_") and is_identifier(m[p][1:])
                            or p == "packet" and m[p] in DUNDER_PACKETS for p in ("packet", "overload")):
        raise Refused(f"calls {text[:120]!r}, not an operator of aten or prims")
    try:
        packet = getattr(getattr(torch.ops, m["ns"]), m["packet"])
        overload = getattr(packet, m["overload"]) if m["overload"] in packet.overloads() else None
    except (AttributeError, RuntimeError):
        overload = None
    if not isinstance(overload, torch._ops.OpOverload):
        raise Refused(f"calls {text[:120]!r}, which is no operator overload this torch knows")
    return overload


# Sizes: list arguments of these names give an output's shape (or its padding, repeats, scales); single
# ints of these operators count its elements. Strides are bounds-checked by torch against the storage.
_COUNTS = {"eye": ("n", "m"), "one_hot": ("num_classes",), "linspace": ("steps",), "logspace": ("steps",),
           "randperm": ("n",), "repeat_interleave": ("repeats",), "bincount": ("minlength",), "histc": ("bins",),
           "tril_indices": ("row", "col"), "triu_indices": ("row", "col"), "multinomial": ("num_samples",),
           "unfold": ("size",)}
_SCALE_NAMES = re.compile(r"scales?(_[hwd])?|scale_factors?")


# views and reshapes keep their input's element count (torch checks it): their sizes allocate nothing new
_SAME_NUMEL = frozenset({"view", "reshape", "_unsafe_view", "unflatten", "view_copy", "_reshape_alias",
                         "_reshape_copy"})


# arange's bounds; its dtype and layout are ints in the schema too (T5 passes dtype=torch.long), not sizes
_ARANGE = {"arange": frozenset({"start", "end", "step"})}


def _size_args(target: torch._ops.OpOverload) -> list[str]:
    """Names of the arguments of ``target`` that decide how many elements its output holds."""
    packet = target._schema.name.split("::", 1)[1]
    if packet in _SAME_NUMEL:
        return []
    names = []
    for a in target._schema.arguments:
        kind = str(a.type)
        kind = kind[len("Optional["):-1] if kind.startswith("Optional[") else kind
        if "stride" in a.name:
            continue
        if kind == "List[int]" or (_SCALE_NAMES.fullmatch(a.name) and kind in ("List[float]", "float")):
            names.append(a.name)
        elif kind in ("int", "number") and (a.name in _COUNTS.get(packet, ()) or a.name in _ARANGE.get(packet, ())):
            names.append(a.name)
    return names


def _elements(values: list[Any], arange: bool) -> float:
    """An upper bound of the elements an operator makes from its size arguments: the product of
    (|v| + 1) over every size (the +1 admits 0 and -1), or for ``arange`` its number of steps."""
    if arange:  # arange(end), arange(start, end), arange(start, end, step)
        start, end, step = (0, values[0], 1) if len(values) == 1 else (*values[:2], values[2] if len(values) > 2 else 1)
        return abs(float(end) - float(start)) / abs(float(step)) + 1 if step else 1.0
    n = 1.0
    for v in values:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if x is not None:
                n *= abs(float(x)) + 1
    return n


_RAISE_TENSOR_LIMIT = "Raise [model] max_tensor_bytes (0 derives it from the model's size) if the model needs that."


def _size_problem(what: str, arange: bool, limit: int, itemsize: int, values: list[Any]) -> str | None:
    n = _elements(values, arange) * itemsize
    if n <= limit:
        return None
    return f"its {what} would make a tensor of about {n:.3g} bytes, over the limit of {limit}"


def check_size(what: str, arange: bool, limit: int, itemsize: int, *values: Any) -> None:
    """Refuse a call whose operator ``what`` would make a tensor over ``limit`` bytes (a check node the
    builder puts before an operator whose sizes come from input sizes)."""
    problem = _size_problem(what, arange, limit, itemsize, list(values))
    if problem:
        raise UnsafeArtifactError(f"Refusing to run the model: at these input sizes {problem}. {_RAISE_TENSOR_LIMIT}")


class _Builder:
    def __init__(self, program: JSONObject, tensor_limit: int = 1 << 62):
        self.program = program
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}
        self.limit = tensor_limit

    # ---- arguments
    def _node(self, name: str) -> torch.fx.Node:
        if name not in self.env:
            raise Unsupported(f"a node reads {name!r} before it is made")
        return self.env[name]

    def _sym(self, arg: JSONObject) -> Any:
        (kind, value), = arg.items()
        if kind == "as_name":
            return self._node(value)
        if kind == "as_float":
            return _float(value)
        if kind in ("as_int", "as_bool"):
            return value
        raise Unsupported(f"symbolic argument {kind}")

    def arg(self, arg: JSONObject) -> Any:
        (kind, value), = arg.items()
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self._node(value["name"])
        if kind in ("as_float", "as_floats"):  # JSON has no inf or nan: torch writes "Infinity", "NaN"
            return [_float(v) for v in value] if isinstance(value, list) else _float(value)
        if kind in _SCALARS:
            return list(value) if isinstance(value, list) else value
        if kind == "as_tensors":
            return [self._node(v["name"]) for v in value]
        if kind == "as_optional_tensors":
            return [None if "as_none" in v else self._node(v["as_tensor"]["name"]) for v in value]
        if kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            return self._sym(value)
        if kind in ("as_sym_ints", "as_sym_floats", "as_sym_bools"):
            return [self._sym(v) for v in value]
        if kind == "as_scalar_type":
            return dtype_of(value)
        if kind == "as_layout":
            return enum_of(LAYOUTS, schema.Layout, value, "layout")
        if kind == "as_memory_format":
            return enum_of(FORMATS, schema.MemoryFormat, value, "memory format")
        if kind == "as_device":
            return torch.device(value["type"]) if value.get("index") is None else torch.device(value["type"], value["index"])
        raise Unsupported(f"argument kind {kind}")

    # ---- nodes
    def target(self, text: str) -> Callable[..., Any]:
        """Resolve a call target (:func:`resolve_target`)."""
        return resolve_target(text)

    def call(self, node: JSONObject) -> None:
        target = self.target(node["target"])
        inputs = node["inputs"]
        if isinstance(target, torch._ops.OpOverload) and target is not torch.ops.aten.item.default:
            args, kwargs = self._schema_args(target, inputs)
            self._bound_sizes(target, inputs, kwargs)
        elif isinstance(target, torch._ops.OpOverload):
            args, kwargs = tuple(self.arg(i["arg"]) for i in inputs), {}
        else:  # a Python operator: on sizes and scalars, never on tensors
            args, kwargs = tuple(self.arg(i["arg"]) for i in inputs), {}
            if any(isinstance(a, torch.fx.Node) and a.op != "call_function" or isinstance(a, list) for a in args) \
                    or any(k in ("as_tensor", "as_tensors") for i in inputs for k in i["arg"]):
                raise Refused(f"applies {node['target']} to a tensor")
            if not any(isinstance(a, torch.fx.Node) for a in args):
                try:  # constants: what it makes is known now
                    target(*args)
                except UnsafeArtifactError as exc:
                    raise Refused(str(exc).removeprefix("Refusing to run the model: ")) from None
                except Exception:  # noqa: BLE001  (ZeroDivisionError and the like: the call itself fails later)
                    pass
        fx = self.graph.create_node("call_function", target, args, kwargs)  # FX names it from the operator
        self._outputs(node["outputs"], fx)

    def _bound_sizes(self, target: torch._ops.OpOverload, inputs: list[JSONObject], kwargs: JSONObject) -> None:
        """Check the sizes ``target`` makes a tensor from: now when they are constants, else per call."""
        names = _size_args(target)
        if not names:
            return
        given = {i["name"]: self.arg(i["arg"]) for i in inputs if i["name"] in names}
        values = [given[n] for n in names if n in given]
        dtype = kwargs.get("dtype")
        itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
        what = str(target).removeprefix("aten.")
        arange = what.startswith("arange")
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
        if any(isinstance(x, torch.fx.Node) for x in flat):
            self.graph.create_node("call_function", check_size, (what, arange, self.limit, itemsize, *values))
            return
        problem = _size_problem(what, arange, self.limit, itemsize, values)
        if problem:
            raise Refused(f"{problem}. {_RAISE_TENSOR_LIMIT}")

    def _schema_args(self, target: torch._ops.OpOverload, inputs: list[JSONObject]) -> tuple[tuple[Any, ...], JSONObject]:
        """Arguments as torch's deserializer places them: positional or keyword by the recorded kind."""
        given = {i["name"]: (self.arg(i["arg"]), i.get("kind")) for i in inputs}
        args: list[Any] = []
        kwargs: JSONObject = {}
        for a in target._schema.arguments:
            if a.name not in given:
                if not a.has_default_value() and not a.kwarg_only:
                    raise Unsupported(f"{target} lacks its argument {a.name!r}")
                continue
            value, kind = given[a.name]
            if kind == schema.ArgumentKind.POSITIONAL or (kind != schema.ArgumentKind.KEYWORD
                                                            and not a.has_default_value() and not a.kwarg_only):
                args.append(value)
            elif keyword.iskeyword(a.name):
                raise Unsupported(f"{target}'s keyword argument {a.name!r}")
            else:
                kwargs[a.name] = value
        return tuple(args), kwargs

    def _outputs(self, outputs: list[JSONObject], fx: torch.fx.Node) -> None:
        if len(outputs) == 1:
            (kind, value), = outputs[0].items()
            if kind == "as_tensor":
                self._name(value["name"], fx)
                return
            if kind in ("as_sym_int", "as_sym_float", "as_sym_bool") and "as_name" in value:
                self._name(value["as_name"], fx)
                return
            if kind == "as_none":
                return
            if kind == "as_tensors":
                outputs = [{"as_tensor": v} for v in value]
        for i, out in enumerate(outputs):
            (kind, value), = out.items()
            if kind == "as_none":
                continue
            if kind != "as_tensor":
                raise Unsupported(f"an operator output of kind {kind}")
            item = self.graph.create_node("call_function", operator.getitem, (fx, i), {})
            self._name(value["name"], item)

    def _name(self, name: str, fx: torch.fx.Node) -> None:
        self.env[name] = fx  # the artifact's name is a key here, never a name in the generated source

    # ---- the whole graph
    def build(self) -> torch.fx.GraphModule:
        graph = self.program["graph_module"]["graph"]
        for i, inp in enumerate(graph["inputs"]):
            if "as_tensor" not in inp:
                raise Unsupported(f"a graph input of kind {next(iter(inp))}")
            self._name(inp["as_tensor"]["name"], self.graph.placeholder(f"input_{i}"))
        for node in graph["nodes"]:
            self.call(node)
        outs = [self.arg(o) for o in graph["outputs"]]
        self.graph.output(outs[0] if graph.get("is_single_tensor_return") else tuple(outs))
        self.graph.lint()
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


def _spec(entry: JSONObject) -> tuple[str, JSONObject]:
    (kind, value), = entry.items()
    return kind, value


def _lifted(archive: Pt2Archive, specs: list[JSONObject]) -> list[torch.Tensor]:
    """The tensors bound to the graph's leading placeholders, mapped from the archive."""
    maps = MappedTensors(archive)
    out = []
    for kind, value in map(_spec, specs):
        if kind == "parameter":
            fqn, table, param = value["parameter_name"], archive.weights, True
        elif kind == "buffer":
            fqn, param = value["buffer_name"], False
            table = archive.weights if fqn in archive.weights else archive.constants
        elif kind == "tensor_constant":
            fqn, table, param = value["tensor_constant_name"], archive.constants, False
        else:
            raise Unsupported(f"a program input of kind {kind}")
        if fqn not in table:
            raise Unsupported(f"no stored tensor for {fqn!r}")
        folder = "weights" if table is archive.weights else "constants"
        out.append(maps.tensor(f"data/{folder}/{table[fqn]['path_name']}", table[fqn], param=param))
    return out


def _user_input(program: JSONObject, name: str) -> UserInput:
    meta = program["graph_module"]["graph"]["tensor_values"].get(name)
    if meta is None:
        raise Unsupported(f"user input {name!r} has no recorded shape")
    ranges = program.get("range_constraints") or {}
    dims: list[int | None] = []
    symbols = []
    for d, size in enumerate(meta["sizes"]):
        if "as_int" in size:
            dims.append(int(size["as_int"]))
            continue
        expr = size.get("as_expr", {}).get("expr_str")
        m = _SYMBOL.fullmatch(expr) if isinstance(expr, str) else None
        if m is None or m["name"] not in ranges:
            raise Unsupported(f"user input {name!r} dim {d} is {expr!r}, not one named dynamic dim")
        sym = m["name"]
        lo, hi = ranges[sym]["min_val"], ranges[sym]["max_val"]
        dims.append(None)
        symbols.append((d, sym, int(lo) if lo is not None else 0, int(hi) if hi is not None and hi < 2**62 else 2**62))
    return UserInput(name, tuple(dims), dtype_of(meta["dtype"]), tuple(symbols))


def build(archive: Pt2Archive, limits: Limits | None = None) -> ExportedForward:
    """The callable program of an inspected archive; :class:`Unsupported` when torch's deserializer must,
    :class:`Refused` for what Kit never runs. ``limits`` (:class:`kit.backends.checks.Limits`) bounds the tensors
    the program makes from sizes (default: derived from the model's size)."""
    program = archive.program
    if program.get("schema_version", {}).get("major") != schema.SCHEMA_VERSION[0]:
        raise Unsupported(f"program schema {program.get('schema_version')}, Kit knows {schema.SCHEMA_VERSION}")
    sig = program["graph_module"]["signature"]
    specs = sig["input_specs"]
    kinds = [_spec(s)[0] for s in specs]
    n_user = kinds.count("user_input")
    if kinds[len(kinds) - n_user:] != ["user_input"] * n_user:
        raise Unsupported("user inputs are not the last placeholders")
    if any(_spec(o)[0] != "user_output" for o in sig["output_specs"]):
        raise Unsupported("the program mutates buffers or returns more than user outputs")
    model_bytes = sum(e.size for rel, e in archive.entries.items() if rel.startswith(("data/weights/", "data/constants/")))
    graph_module = _Builder(program, tensor_limit(limits or DEFAULT_LIMITS, model_bytes)).build()
    user = [_spec(s)[1]["arg"] for s in specs[len(specs) - n_user:]]
    if any("as_tensor" not in u for u in user):
        raise Unsupported("a user input is not a tensor")
    inputs = [_user_input(program, u["as_tensor"]["name"]) for u in user]
    from torch.utils._pytree import treespec_loads

    try:
        out_spec = program["graph_module"]["module_call_graph"][0]["signature"]["out_spec"]
    except (KeyError, IndexError, TypeError):
        raise Unsupported("the program records no output structure") from None
    return ExportedForward(graph_module, _lifted(archive, specs[: len(specs) - n_user]), inputs,
                           treespec_loads(out_spec))
