"""Progress while a notebook runs: the gate process follows the run's records file and says each step.

The kernel appends a ``begin`` record when a check starts (with its time budget), a ``check`` record with
its figure, and an ``end`` record with its time (:func:`kit.gate.record.step`); a thread of the gate process
reads new whole lines and turns each into one progress line, so a slow model shows where it is instead of
one status line for minutes. Lines are only shown: the verdict reads the records once, after the run.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kit.gate.evidence import Check
from kit.progress import begin_line, end_line

POLL_S = 0.25


def describe(rec: Mapping[str, Any]) -> str | None:
    """One progress line for a record (None: nothing to say)."""
    kind = rec.get("kind")
    if kind == "begin":  # the begin and end lines every face shares (kit.progress)
        return begin_line(str(rec.get("step")), f"budget {_num(rec.get('budget_s'))}s")
    if kind == "end":
        return end_line(str(rec.get("step")), rec.get("seconds"))
    if kind == "check":
        try:
            c = Check.from_dict(rec)
        except (KeyError, TypeError):
            return None
        return ("  ✓ " if c.passed else "  ✗ ") + c.line()
    if kind == "baseline":
        return f"  compared with production {rec.get('ref')}"
    return None


def _num(v: object) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


class Follower:
    """Follows ``path`` in a thread and calls ``say`` with ``prefix`` + a line for each new record."""

    def __init__(self, path: Path, say: Callable[[str], None], prefix: str = "") -> None:
        self.path, self.say, self.prefix = Path(path), say, prefix
        self._offset = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kit-gate-progress", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # what was written after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Say every whole line appended since the last poll (a torn last line waits for its end)."""
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(1 << 20)
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            line = describe(rec) if isinstance(rec, dict) else None
            if line:
                try:
                    self.say(self.prefix + line)
                except Exception:  # a broken progress sink must not break the gate
                    self._stop.set()
                    return
