"""The program text a ``.pt2`` holds that torch would evaluate, held to a small grammar.

torch's deserializer passes ``expr_str`` to sympy's ``sympify`` (which is ``eval``), ``.module()`` compiles
``guards_code`` with ``exec``, node ``target`` strings are resolved with ``getattr`` from the ``torch``
module (``torch.os.system`` resolves, and so do ``torch.ops.load_library`` and ``torch.ops.import_module``),
and torch.fx writes graph names into the Python source it generates and ``exec``s.
:func:`program_text_problem` walks a parsed program and names the first piece of text outside what Kit's
own captures contain: a call target that is not an operator of an allowed namespace (``aten``, ``prims``),
one of a fixed table of Python operators on sizes, or a known control-flow operator; a graph name that is
not a plain identifier; a dotted name that is not dotted identifiers. :func:`parse_program` parses the JSON
refusing integers outside int64 (a size computed from ``2**100000`` would be unbounded work). :mod:`kit.backends.pt2.archive`
refuses the archive.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections.abc import Callable, Iterator
from typing import Any

from kit._types import JSONObject

# Sympy names torch's deserializer may meet in an ``expr_str`` (srepr form), and the guard grammar.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "S"})
_SYMBOL = re.compile(r"[a-z]{1,8}\d{1,9}")
# Call targets. Every part is a plain identifier, no dunder; an operator of an allowed namespace is looked
# up by :func:`kit.backends.pt2.fx_build.resolve_target` as namespace -> packet -> overload and must be an OpOverload.
OP_NAMESPACES = ("aten", "prims")
# aten's bitwise operators are packets with dunder names (torch.ops.aten.__and__.Tensor, from `mask & mask`
# in Hugging Face attention code): these ten, by name, and no other dunder
DUNDER_PACKETS = frozenset(f"__{op}__" for op in ("and", "or", "xor", "lshift", "rshift",
                                                  "iand", "ior", "ixor", "ilshift", "irshift"))
OP_TARGET = re.compile(r"torch\.ops\.(?P<ns>aten|prims)\.(?P<packet>_?[a-z][a-z0-9_]{0,99}|__[a-z]{2,7}__)"
                       r"\.(?P<overload>[A-Za-z][A-Za-z0-9_]{0,99})")
# aten operators that read files, print, swap storages or skip bounds checks: never in a captured model
# (_unsafe_view is a plain view: torch.export writes it for matmul reshapes)
_DENIED_PACKETS = re.compile(r"(?!_unsafe_view$).*(file|unsafe|_print|cufft|pin_memory|record_stream).*|set|set_|set_data")
# Python operators on sizes (torch.export records SymInt arithmetic as these), by fixed table
PY_OPERATORS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
})
MATH_FUNCTIONS = frozenset({"ceil", "floor", "trunc", "sqrt"})
SYM_FUNCTIONS = frozenset({"sym_not", "sym_float", "sym_int", "sym_max", "sym_min", "sym_ite", "sym_sqrt",
                           "sym_sum", "_sym_sqrt"})
# control flow: the FX builder does not build it; only torch's deserializer (an opt-in) does
HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "scan", "associative_scan"})
# graph names (node, input, output, symbol names) and dotted module paths (parameter and buffer names)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_NAME_KEYS = frozenset({"name", "as_name"})
_NAME_MAPS = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values")
_DOTTED_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"})
INT64 = 1 << 63
_GUARD_CALLS = frozenset({"Max", "Min", "Eq", "Ne", "FloorDiv", "Mod", "PythonMod", "CeilDiv", "CleanDiv",
                          "IntTrueDiv"})
_SIZE_METHODS = frozenset({"size", "stride", "dim", "numel", "storage_offset"})


def _safe_sympy(node: ast.AST) -> bool:
    if isinstance(node, ast.Expression):
        return _safe_sympy(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        return isinstance(v, (int, float, bool)) or (isinstance(v, str) and bool(_SYMBOL.fullmatch(v)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _safe_sympy(node.operand)
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
        return all(_safe_sympy(a) for a in node.args) and all(
            k.arg is not None and k.arg.isalpha()
            and isinstance(k.value, ast.Constant) and isinstance(k.value.value, bool)
            for k in node.keywords)
    return False


def _safe_guard(node: ast.AST) -> bool:
    if isinstance(node, ast.Expression):
        return _safe_guard(node.body)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, bool, str))
    if isinstance(node, ast.Name):
        return node.id == "inf"
    if isinstance(node, ast.Attribute):  # math.inf
        return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr == "inf"
    if isinstance(node, (ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp)):
        ops = node.ops if isinstance(node, ast.Compare) else [node.op]
        if any(isinstance(o, (ast.Is, ast.IsNot, ast.In, ast.NotIn, ast.MatMult)) for o in ops):
            return False
        kids = [*getattr(node, "comparators", []), *getattr(node, "values", [])]
        kids += [getattr(node, f) for f in ("left", "right", "operand") if hasattr(node, f)]
        return all(_safe_guard(k) for k in kids)
    if isinstance(node, ast.Subscript):  # L['name'] or <call>[i]
        if isinstance(node.value, ast.Name):
            return node.value.id == "L" and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)
        return _safe_guard(node.value) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)
    if isinstance(node, ast.Call) and not node.keywords:
        f = node.func
        if isinstance(f, ast.Name):
            return f.id in _GUARD_CALLS and all(_safe_guard(a) for a in node.args)
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math":
            return f.attr in ("isnan", "isinf") and all(_safe_guard(a) for a in node.args)
        if isinstance(f, ast.Attribute) and f.attr in _SIZE_METHODS and len(node.args) <= 1:
            return _safe_guard(f.value) and all(
                isinstance(a, ast.Constant) and isinstance(a.value, int) for a in node.args)
    return False


def _parses_safely(text: str, check: Callable[[ast.AST], bool]) -> bool:
    if len(text) > 10_000:
        return False
    try:
        return bool(check(ast.parse(text, mode="eval")))
    except (SyntaxError, ValueError, RecursionError):
        return False


def _walk(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    stack = [(key, obj)]
    while stack:
        k, o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.items())
        elif isinstance(o, list):
            stack.extend((k, v) for v in o)
        else:
            yield k, o


def is_identifier(value: object) -> bool:
    """A plain Python identifier of at most 200 characters: no keyword, no dunder."""
    return (isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None
            and not keyword.iskeyword(value) and not value.startswith("__"))


def is_dotted(value: object) -> bool:
    """Dotted identifiers (``encoder.layers.0.linear1.weight``: module paths may hold list indexes)."""
    if not isinstance(value, str) or len(value) > 1000:
        return False
    return value == "" or all(is_identifier(p) or (p.isdigit() and len(p) < 10) for p in value.split("."))


def _safe_target(value: object) -> bool:
    if not isinstance(value, str):
        return False
    head, _, rest = value.partition(".")
    if head == "_operator":
        return rest in PY_OPERATORS
    if head == "math":
        return rest in MATH_FUNCTIONS
    if head == "torch" and rest in SYM_FUNCTIONS:
        return True
    if value.startswith("torch.ops.higher_order."):
        return value.removeprefix("torch.ops.higher_order.") in HIGHER_ORDER
    m = OP_TARGET.fullmatch(value)
    return (m is not None and ("__" not in m["packet"] or m["packet"] in DUNDER_PACKETS) and "__" not in m["overload"]
            and not _DENIED_PACKETS.fullmatch(m["packet"]))


class ProgramTextError(ValueError):
    """The program JSON holds a value Kit refuses while parsing it."""


def _bounded_int(text: str) -> int:
    if len(text) > 20 or not -INT64 <= (value := int(text)) < INT64:
        raise ProgramTextError(f"an integer outside int64 ({text[:40]}{'...' if len(text) > 40 else ''})")
    return value


def parse_program(raw: bytes) -> Any:
    """The program JSON, refusing integers outside int64 while parsing (``ProgramTextError``)."""
    return json.loads(raw, parse_int=_bounded_int)


def _name_problem(program: JSONObject) -> str | None:
    graphs = [program.get("graph_module", {}).get("graph")]
    while graphs:
        graph = graphs.pop()
        if not isinstance(graph, dict):
            continue
        for key in _NAME_MAPS:
            bad = next((k for k in graph.get(key) or {} if not is_identifier(k)), None)
            if bad is not None:
                return f"names a value {str(bad)[:120]!r}, not a plain identifier"
        for node in graph.get("nodes") or []:
            for arg in node.get("inputs") or [] if isinstance(node, dict) else []:
                sub = arg.get("arg", {}).get("as_graph") if isinstance(arg, dict) and isinstance(arg.get("arg"), dict) else None
                if isinstance(sub, dict):
                    graphs.append(sub.get("graph"))
    for key, value in _walk(program):
        if key in _NAME_KEYS and value not in (None, "") and not is_identifier(value):
            return f"names a value {str(value)[:120]!r}, not a plain identifier"
        if key in _DOTTED_KEYS and not is_dotted(value):
            return f"names a module path {str(value)[:120]!r}, not dotted identifiers"
    return None


def program_text_problem(program: JSONObject) -> str | None:
    """Why ``program`` (a parsed ``models/<name>.json``) must not be loaded, or None when every guard,
    symbolic expression, call target and name is inside the grammar."""
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _parses_safely(guard, _safe_guard):
            return f"holds guard code outside the shape-check grammar: {str(guard)[:120]!r}"
    for key, value in _walk(program):
        if key == "expr_str" and not (isinstance(value, str) and _parses_safely(value, _safe_sympy)):
            return f"holds a symbolic expression torch would eval: {str(value)[:120]!r}"
        if key == "target" and not _safe_target(value):
            return (f"calls {str(value)[:120]!r}, not an operator of {'/'.join(OP_NAMESPACES)} nor a Python "
                    "operator on sizes")
    return _name_problem(program)
