"""Where a model came from: the notebook (or script) that registered it, and the git commit.

The one deliberate reader of ``os.environ`` in the library: Jupyter and papermill announce the notebook
only there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from kit._types import JSONObject


def detect_source(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> JSONObject:
    """Where the model came from: the notebook (Jupyter sets JPY_SESSION_NAME) or script, and git."""
    environ = os.environ if environ is None else environ
    cwd = Path(cwd or os.getcwd())
    src: JSONObject = {}
    if environ.get("JPY_SESSION_NAME"):
        src.update(kind="notebook", path=environ["JPY_SESSION_NAME"])
    elif environ.get("PAPERMILL_INPUT_PATH"):
        src.update(kind="notebook", path=environ["PAPERMILL_INPUT_PATH"])
    elif "ipykernel" in sys.modules:
        src.update(kind="notebook", path=None)
    else:
        src.update(kind="script", path=os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            src["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd, capture_output=True, text=True, timeout=5,
            )
            src["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return src
