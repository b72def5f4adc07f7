"""Set Kit up in an existing project (``kit init``): configuration, a validation notebook to edit,
``.gitignore`` lines, and a check that the project's environment declaration names kit.

It never overwrites a file: an existing ``kit.toml`` or notebook is kept as it is, and ``.gitignore``
only gains the lines it lacks. :func:`init_project` says what it did in an :class:`InitResult`.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit._io import atomic_write_text
from kit.errors import ConfigError

NOTEBOOK = Path("notebooks") / "validation" / "default.ipynb"
# the replay gate (captured traffic); not in `validation` by default: it needs a capture folder parameter
REPLAY = Path("notebooks") / "validation" / "replay.ipynb"
IGNORED = ("/registry/", "/dist/")
# "kit" as a requirement: kit, kit[notebook], kit==0.1, kit>=0.1 ... but not kitten or my-kit.
_KIT_REQ = re.compile(r"""^\s*kit\s*(\[[^\]]*\])?\s*(?:[=<>!~;@].*)?$""", re.IGNORECASE)
_YML_ITEM = re.compile(r"""^\s*-\s*["']?([^"'#]+?)["']?\s*(?:#.*)?$""")


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_project` did: files written, files kept, lines added, warnings."""

    root: Path
    written: tuple[Path, ...] = ()
    kept: tuple[Path, ...] = ()
    gitignore_added: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        """One line per action, for a person."""
        out = [f"wrote {self._rel(p)}" for p in self.written]
        out += [f"kept {self._rel(p)} (exists; not overwritten)" for p in self.kept]
        if self.gitignore_added:
            out.append(f"added {', '.join(self.gitignore_added)} to .gitignore")
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def _rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)


def kit_toml(registry: str = "registry", services: str = "services", notebook: Path = NOTEBOOK) -> str:
    """The kit.toml ``kit init`` writes (paths relative to the project root)."""
    return (
        "# Kit settings for this project (Kit's docs/own-project.md says what each one does).\n"
        "# Paths are relative to this file. KIT_* environment variables and command-line options win.\n"
        f"registry = {_toml_str(registry)}      # model versions, aliases, gate evidence\n"
        f"services = {_toml_str(services)}      # generated services (kit service new, %deploy --service)\n"
        "# The validation notebooks every gate runs (kit validate, %deploy, the panel). Edit the copy.\n"
        f"validation = [{_toml_str(notebook.as_posix())}]\n"
    )


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def init_project(root: Path, *, registry: str = "registry", services: str = "services") -> InitResult:
    """Set Kit up in the project at ``root`` (created if missing); never overwrites a file."""
    from kit.gate.runner import DEFAULT_NOTEBOOK
    from kit.replay import REPLAY_NOTEBOOK

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is not a folder; give the project's folder to set Kit up in.")
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    kept: list[Path] = []
    warnings: list[str] = []

    toml = root / "kit.toml"
    pyproject_kit = _pyproject_has_tool_kit(root / "pyproject.toml")
    if toml.exists():
        kept.append(toml)
    elif pyproject_kit:
        warnings.append("pyproject.toml has a [tool.kit] table: kept it as the settings and wrote no kit.toml "
                        f"(a kit.toml would shadow it); add validation = [\"{NOTEBOOK.as_posix()}\"] there to "
                        "gate with the notebook copy")
    else:
        atomic_write_text(toml, kit_toml(registry, services))
        written.append(toml)

    for src, nb in ((DEFAULT_NOTEBOOK, root / NOTEBOOK), (REPLAY_NOTEBOOK, root / REPLAY)):
        if nb.exists():
            kept.append(nb)
            continue
        nb.parent.mkdir(parents=True, exist_ok=True)
        tmp = nb.with_name(f".{nb.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(nb)
        written.append(nb)

    added = _add_gitignore_lines(root / ".gitignore", (f"/{registry.strip('/')}/", *IGNORED[1:]))
    warnings += environment_warnings(root)
    return InitResult(root, tuple(written), tuple(kept), tuple(added), tuple(warnings))


def _pyproject_has_tool_kit(path: Path) -> bool:
    data = _read_toml(path)
    return isinstance(data.get("tool"), dict) and "kit" in data["tool"]


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}). Fix it, then run kit init again.") from exc


def _add_gitignore_lines(path: Path, lines: tuple[str, ...]) -> list[str]:
    """Append the lines ``path`` lacks (an existing file keeps every line it has)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    have = {ln.strip() for ln in text.splitlines()}
    missing = [ln for ln in lines if ln not in have and ln.strip("/") not in have and ln.lstrip("/") not in have]
    if missing:
        sep = "" if not text or text.endswith("\n") else "\n"
        atomic_write_text(path, text + sep + "# Kit: the model registry and built archives\n" + "\n".join(missing) + "\n")
    return missing


def environment_warnings(root: Path) -> list[str]:
    """Warnings when the project's environment declaration does not name kit (or there is none).

    Looks at ``environment.yml``/``environment.yaml`` (conda; kit under ``pip:``), ``pyproject.toml``
    (``[project] dependencies``, optional dependencies, dependency groups) and ``requirements*.txt``.
    """
    found: list[str] = []
    for name in ("environment.yml", "environment.yaml"):
        p = root / name
        if p.is_file():
            found.append(name)
            if any(_names_kit(m.group(1)) for m in map(_YML_ITEM.match, p.read_text(encoding="utf-8").splitlines()) if m):
                return []
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        found.append("pyproject.toml")
        if any(_names_kit(r) for r in _pyproject_requirements(_read_toml(pyproject))):
            return []
    for p in sorted(root.glob("requirements*.txt")):
        found.append(p.name)
        if any(_names_kit(ln.split("#")[0]) for ln in p.read_text(encoding="utf-8").splitlines()):
            return []
    if not found:
        return ["no environment declaration (environment.yml, pyproject.toml or requirements.txt) found: declare "
                "the environment, with kit[notebook] in it, so a server can rebuild the one you validated in"]
    return [f"{' / '.join(found)} does not name kit: add \"kit[notebook]\" (under pip: in environment.yml, or to "
            "[project] dependencies), so a server's environment has kit too"]


def _names_kit(requirement: str) -> bool:
    return bool(_KIT_REQ.match(requirement.strip()))


def _pyproject_requirements(data: dict[str, Any]) -> list[str]:
    project = data.get("project")
    reqs: list[str] = []
    if isinstance(project, dict):
        reqs += [str(r) for r in project.get("dependencies", []) or []]
        for group in (project.get("optional-dependencies") or {}).values():
            reqs += [str(r) for r in group]
    groups = data.get("dependency-groups")
    if isinstance(groups, dict):
        reqs += [str(r) for g in groups.values() if isinstance(g, list) for r in g if isinstance(r, str)]
    return reqs
