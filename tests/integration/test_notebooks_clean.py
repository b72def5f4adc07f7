"""Every committed notebook under notebooks/ is stored without outputs or execution counts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def committed_notebooks() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "notebooks"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, check=True).stdout
        files = [ROOT / p for p in out.split("\0") if p.endswith(".ipynb")]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): check the files
        files = sorted((ROOT / "notebooks").rglob("*.ipynb"))
    return [p for p in files if p.is_file() and ".ipynb_checkpoints" not in p.parts]


def dirty_cells(nb: dict) -> list[str]:
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i}: {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i}: execution_count {cell['execution_count']}")
    if nb.get("metadata", {}).get("widgets"):
        problems.append("metadata.widgets holds saved widget state")
    return problems


def test_quickstart_is_committed():
    assert ROOT / "notebooks" / "quickstart.ipynb" in committed_notebooks()


@pytest.mark.parametrize("path", committed_notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_has_no_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = dirty_cells(nb)
    assert not problems, (
        f"{path.relative_to(ROOT)} is committed with outputs ({'; '.join(problems)}). Strip them with "
        f"`jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)}`."
    )


def test_the_check_finds_outputs():
    # The check itself must be able to fail.
    nb = {"cells": [{"cell_type": "code", "execution_count": 3, "outputs": [{"output_type": "stream"}]}]}
    assert dirty_cells(nb) == ["cell 0: 1 output(s)", "cell 0: execution_count 3"]


def test_quickstart_names_the_environments_kernel():
    # `make env` installs the environment's kernelspec as "kit"; `make lab` and papermill pick it by name.
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "kit"
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
