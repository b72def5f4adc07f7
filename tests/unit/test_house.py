"""The house rules of ../shared/STYLE.md that a reader feels first, held for every module of kit/: a module
fits in 500 lines and a function (or method) in 100, so each can be read at once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 100


def _sources() -> list[Path]:
    return sorted((ROOT / "kit").rglob("*.py"))


def long_functions(source: str, name: str, limit: int) -> list[str]:
    """``name:line function (N lines)`` for each function of ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_module_over_500_lines() -> None:
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "split these modules by what they do:\n" + "\n".join(long)


def test_no_function_over_100_lines() -> None:
    long = [f for p in _sources() for f in long_functions(p.read_text(), str(p.relative_to(ROOT)), MAX_FUNCTION_LINES)]
    assert not long, "split these functions into named steps:\n" + "\n".join(long)


def test_the_checker_finds_a_long_method_and_passes_a_short_one() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(100))
    src = f"class C:\n    def short(self):\n        return 1\n\n    def long(self):\n{body}\n"
    assert long_functions(src, "m.py", 100) == ["m.py:5 long (101 lines)"]
