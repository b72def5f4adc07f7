"""The import graph of kit/: no circle, and no import from a lower layer to a higher one.

The layers are docs/architecture.md's ("Layers and who may import whom"): shells import the library, the
library imports the core, never the reverse; the serving runtime never imports the gate, the notebook
shells or Jupyter. kit/ is parsed with ``ast`` (nothing is imported or run), and every import counts,
the ones inside functions too: a function-level import is how a circle or a breach hides.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2] / "kit"

# Module-name prefixes per layer, most specific first. Every module of kit/ must match one (a new module
# gets a layer when it is written). ``kit`` itself is the notebook extension's entry point: a shell.
LAYERS: tuple[tuple[str, str], ...] = (
    ("kit._version", "core"), ("kit._types", "core"),
    ("kit.errors", "core"), ("kit._io", "core"), ("kit.config", "core"), ("kit.signing", "core"),
    ("kit.capture", "core"), ("kit._capture_shapes", "core"), ("kit._capture_io", "core"),
    ("kit.signature", "core"), ("kit.env", "core"),
    ("kit.registry", "core"), ("kit.evidence", "core"), ("kit.backends", "core"),
    ("kit.version_files", "core"), ("kit.guard_key", "core"), ("kit._proc", "core"), ("kit.progress", "core"),
    ("kit.deploy", "library"), ("kit.gate", "library"), ("kit.servicegen", "library"),
    ("kit.service_settings", "library"), ("kit.pack", "library"), ("kit.traffic", "library"),
    ("kit.render", "library"), ("kit.project", "library"), ("kit.ci", "library"), ("kit.replay", "library"),
    ("kit.serving", "library"), ("kit.fleet", "library"),
    ("kit.cli", "shell"), ("kit.magics", "shell"), ("kit.widgets", "shell"), ("kit.demo", "shell"),
    ("kit", "shell"),
)
RANK = {"core": 0, "library": 1, "shell": 2}
SERVING_BANNED = ("kit.gate", "kit.magics", "kit.widgets", "kit.cli", "kit.demo", "kit.deploy",
                  "IPython", "ipywidgets", "papermill", "nbconvert", "nbformat", "jupyter_client")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(KIT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(KIT.rglob("*.py"))}


def layer_of(name: str) -> str | None:
    for prefix, layer in LAYERS:
        if name == prefix or (prefix != "kit" and name.startswith(prefix + ".")):
            return layer
    return None


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The most specific module of kit/ that importing ``name`` names (an attribute falls to its module)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth. Names outside kit/ are kept
    whole (``IPython.core``); kit names resolve to the module that holds them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (_resolve(alias.name, known) if alias.name.split(".")[0] == "kit" else alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "kit":
                yield base, node.lineno
                continue
            for alias in node.names:  # `from kit.x import y` imports kit.x.y when that is a module
                yield _resolve(f"{base}.{alias.name}", known), node.lineno


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: {dep: line for dep, line in imports(name, path, known)} for name, path in known.items()}


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a path a -> .. -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return [w for w in g.get(v, {}) if w in g and w != v]

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path(set(comp), min(comp), edges))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def _path(comp: set[str], start: str, edges: object) -> list[str]:
    """A shortest way from ``start`` back to itself inside one component (breadth first)."""
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in edges(v):  # type: ignore[operator]
            if w == start:
                back = [v]
                while back[-1] != start:
                    back.append(prev[back[-1]])
                return [*reversed(back), start]
            if w in comp and w not in prev:
                prev[w] = v
                todo.append(w)
    return sorted(comp)


def test_every_module_has_a_layer() -> None:
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"modules without a layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_import_circle() -> None:
    found = cycles(graph())
    assert not found, "import circles in kit/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_point_inward() -> None:
    g, known = graph(), modules()
    bad = []
    for name, deps in sorted(g.items()):
        mine = layer_of(name)
        for dep, line in sorted(deps.items()):
            theirs = layer_of(dep) if dep in known else None
            if mine and theirs and RANK[theirs] > RANK[mine]:
                bad.append(f"{known[name].relative_to(KIT.parent)}:{line}: {name} ({mine}) imports {dep} ({theirs})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def _reach(g: dict[str, dict[str, int]], start: str) -> dict[str, list[str]]:
    """Every name reachable from ``start`` through kit's modules, with the chain that reaches it."""
    seen = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in g.get(v, {}):
            if w not in seen:
                seen[w] = [*seen[v], w]
                if w in g:
                    todo.append(w)
    return seen


def test_serving_never_reaches_the_gate_or_jupyter() -> None:
    g = graph()
    bad = []
    for name in sorted(m for m in g if m == "kit.serving" or m.startswith("kit.serving.")):
        for dep, chain in _reach(g, name).items():
            if any(dep == b or dep.startswith(b + ".") for b in SERVING_BANNED):
                bad.append(" -> ".join(chain))
    assert not bad, "kit.serving reaches what a server never imports:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("g, expected", [
    ({"kit.a": {"kit.b": 1}, "kit.b": {"kit.a": 1}}, [["kit.a", "kit.b", "kit.a"]]),
    ({"kit.a": {"kit.b": 1}, "kit.b": {"kit.c": 1}, "kit.c": {"kit.a": 1}, "kit.d": {"kit.a": 1}},
     [["kit.a", "kit.b", "kit.c", "kit.a"]]),
    ({"kit.a": {"kit.b": 1, "torch": 1}, "kit.b": {}}, []),
])
def test_the_checker_finds_a_circle(g: dict[str, dict[str, int]], expected: list[list[str]]) -> None:
    assert cycles(g) == expected


def test_the_checker_reads_function_level_and_relative_imports(tmp_path: Path) -> None:
    known = {"kit.a": tmp_path / "a.py", "kit.b": tmp_path / "b.py", "kit.p.c": tmp_path / "c.py"}
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from kit import b\n    from . import a\n    import IPython.core\n")
    assert dict(imports("kit.x", src, known)) == {"kit.b": 2, "kit.a": 3, "IPython.core": 4}
