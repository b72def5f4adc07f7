"""The program text a ``.pt2`` holds that torch would evaluate, held to a small grammar.

torch's deserializer passes ``expr_str`` to sympy's ``sympify`` (which is ``eval``), ``.module()`` compiles
``guards_code`` with ``exec``, and node ``target`` strings are resolved with ``getattr`` from the ``torch``
module (``torch.os.system`` resolves). :func:`program_text_problem` walks a parsed program and names the
first piece of text outside what Kit's own captures contain; :mod:`kit.artifacts` refuses the archive.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterator

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
_OPERATORS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "matmul",
})
_TARGET = re.compile(r"torch\.ops\.[A-Za-z_]\w*\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?"
                     r"|math\.[a-z_]\w*|torch\.sym_[a-z_]+|torch\._sym_sqrt")
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
        ops = getattr(node, "ops", None) or [getattr(node, "op")]
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


def _parses_safely(text: str, check: Any) -> bool:
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


def _safe_target(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("_operator."):
        return value.removeprefix("_operator.") in _OPERATORS
    # torch.ops.aten.from_file maps files; no other aten operator touches the file system.
    return bool(_TARGET.fullmatch(value)) and "file" not in value


def program_text_problem(program: dict[str, Any]) -> str | None:
    """Why ``program`` (a parsed ``models/<name>.json``) must not be loaded, or None when every guard,
    symbolic expression and call target is inside the grammar."""
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _parses_safely(guard, _safe_guard):
            return f"holds guard code outside the shape-check grammar: {str(guard)[:120]!r}"
    for key, value in _walk(program):
        if key == "expr_str" and not (isinstance(value, str) and _parses_safely(value, _safe_sympy)):
            return f"holds a symbolic expression torch would eval: {str(value)[:120]!r}"
        if key == "target" and not _safe_target(value):
            return f"calls {str(value)[:120]!r}, not a torch operator"
    return None
