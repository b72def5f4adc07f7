"""What the pack modules share: the progress callback, byte counts for people, the format version."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("kit.pack")

Progress = Callable[[str], None]
FORMAT_VERSION = 1  # kit-pack.json's schema; also keys the cached environment layers
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store"}


def say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
