"""`kit init`: sets Kit up in an existing project, never overwrites a file, says what it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kit.cli import cli
from kit.config import load_config
from kit.errors import ConfigError
from kit.gate import DEFAULT_NOTEBOOK, declared_params
from kit.project import environment_warnings, init_project
from kit.replay import REPLAY_NOTEBOOK


def test_init_in_an_empty_folder_writes_config_notebook_and_gitignore(tmp_path):
    res = init_project(tmp_path / "proj")
    root = tmp_path / "proj"
    assert res.written == (root / "kit.toml", root / "notebooks" / "validation" / "default.ipynb",
                           root / "notebooks" / "validation" / "replay.ipynb")
    assert (root / "notebooks" / "validation" / "replay.ipynb").read_bytes() == REPLAY_NOTEBOOK.read_bytes()
    assert res.gitignore_added == ("/registry/", "/dist/")
    assert (root / ".gitignore").read_text().splitlines()[-2:] == ["/registry/", "/dist/"]
    nb = root / "notebooks" / "validation" / "default.ipynb"
    assert nb.read_bytes() == DEFAULT_NOTEBOOK.read_bytes() and "data" in declared_params(nb)
    assert len(res.warnings) == 1 and "no environment declaration" in res.warnings[0]
    cfg = load_config(cwd=root, environ={})
    assert cfg.registry == root / "registry" and cfg.services == root / "services"
    assert cfg.validation == (nb,)  # every face gates with the project's copy from now on
    assert res.lines()[:4] == ["wrote kit.toml", "wrote notebooks/validation/default.ipynb",
                               "wrote notebooks/validation/replay.ipynb", "added /registry/, /dist/ to .gitignore"]


def test_init_twice_keeps_everything(tmp_path):
    init_project(tmp_path)
    (tmp_path / "kit.toml").write_text('registry = "elsewhere"\n')
    (tmp_path / "notebooks" / "validation" / "default.ipynb").write_text("{}")  # the user's edits
    before = (tmp_path / ".gitignore").read_text()
    res = init_project(tmp_path)
    assert res.written == () and res.gitignore_added == ()
    assert res.kept == (tmp_path / "kit.toml", tmp_path / "notebooks" / "validation" / "default.ipynb",
                        tmp_path / "notebooks" / "validation" / "replay.ipynb")
    assert (tmp_path / "kit.toml").read_text() == 'registry = "elsewhere"\n'
    assert (tmp_path / "notebooks" / "validation" / "default.ipynb").read_text() == "{}"
    assert (tmp_path / ".gitignore").read_text() == before
    assert "kept kit.toml (exists; not overwritten)" in res.lines()


def test_gitignore_keeps_its_lines_and_gains_only_the_missing(tmp_path):
    (tmp_path / ".gitignore").write_text("*.pyc\nregistry/")  # no final newline, registry already there
    res = init_project(tmp_path)
    assert res.gitignore_added == ("/dist/",)
    text = (tmp_path / ".gitignore").read_text()
    assert text.startswith("*.pyc\nregistry/\n") and text.endswith("/dist/\n") and text.count("registry/") == 1


def test_pyproject_with_tool_kit_gets_no_kit_toml(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["kit[notebook]>=0.1"]\n'
                                             '[tool.kit]\nregistry = "models"\n')
    res = init_project(tmp_path)
    assert not (tmp_path / "kit.toml").exists()
    assert len(res.warnings) == 1 and "[tool.kit]" in res.warnings[0] and "validation = [" in res.warnings[0]


@pytest.mark.parametrize(("files", "names_kit"), [
    ({"environment.yml": "dependencies:\n  - python=3.11\n  - pip:\n    - kit[notebook]==0.1.0\n"}, True),
    ({"environment.yml": "dependencies:\n  - pip:\n    - 'kit'  # ours\n"}, True),
    ({"environment.yml": "dependencies:\n  - pip:\n    - kitten\n    - my-kit\n"}, False),
    ({"pyproject.toml": '[project]\nname = "x"\ndependencies = ["torch"]\n'
                        '[project.optional-dependencies]\nserve = ["kit>=0.1"]\n'}, True),
    ({"pyproject.toml": '[project]\nname = "x"\ndependencies = ["torch", "kitchen"]\n'}, False),
    ({"requirements.txt": "torch==2.13.0\nKit[notebook] ; python_version >= '3.10'\n"}, True),
])
def test_the_environment_declaration_must_name_kit(tmp_path, files, names_kit):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    warnings = environment_warnings(tmp_path)
    if names_kit:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "does not name kit" in warnings[0] and next(iter(files)) in warnings[0]


def test_kit_init_command(tmp_path):
    (tmp_path / "environment.yml").write_text("dependencies:\n  - pip:\n    - torch\n")
    r = CliRunner().invoke(cli, ["init", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "wrote kit.toml" in r.output and "wrote notebooks/validation/default.ipynb" in r.output
    assert "warning: environment.yml does not name kit" in r.output
    r = CliRunner().invoke(cli, ["init", str(tmp_path / "kit.toml")])
    assert r.exit_code == 2 and "is a file" in r.output  # click says so before kit runs
    with pytest.raises(ConfigError, match="is not a folder"):
        init_project(tmp_path / "kit.toml")


def test_the_packaged_notebook_is_package_data():
    """What puts the notebook into the wheel (the wheel test installs it for real)."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert "notebooks/**/*" in data["tool"]["setuptools"]["package-data"]["kit"]
    assert DEFAULT_NOTEBOOK.is_relative_to(root / "kit")


def test_nothing_in_the_package_imports_the_demo():
    """The demo passes its data to the gate; no other module may depend on it (an installed kit has no demo data)."""
    root = Path(__file__).resolve().parents[2] / "kit"
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "demo.py"
             and any(s in p.read_text(encoding="utf-8") for s in ("kit.demo", "from kit import demo"))]
    assert users == []
    for nb in (root / "notebooks").rglob("*.ipynb"):
        assert "kit.demo" not in nb.read_text(encoding="utf-8"), nb
