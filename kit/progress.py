"""Progress of a long library call (capture, register): named steps, each timed and said as it goes.

One shape for every face, the gate's (:mod:`kit.gate.progress`): ``progress`` is a callable that takes one
line. A step says ``"  … NAME"`` when it begins and ``"    NAME: 1.2s"`` when it ends (the gate's begin and
end lines, from :func:`begin_line` and :func:`end_line`). What a call's ``progress=`` argument means:

- a callable: every begin and end line goes to it (``%deploy`` shows them in the running step's line);
- ``None`` or ``True`` (the default): one line per step on stderr when it ends, with its seconds
  (``kit register digits: save 0.4s``), for scripts and the command line;
- ``False``: nothing;
- a :class:`Steps`: the call says its steps there and its seconds add to that object's (``deploy`` does
  this to fill its steps' ``parts``).

Whatever the sink, :attr:`Steps.seconds` keeps each step's seconds (capture puts them in meta.json's
``capture.steps``; ``deploy`` in its steps' ``parts``). A sink that raises is dropped (logged once): progress
never breaks the call it reports on. A transfer inside a step (a bucket upload) reports its bytes through
:meth:`Steps.meter`: lines to a caller's sink, one updating line on a terminal. Standard library only (tqdm
draws the terminal bar when it is importable; nothing requires it).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def begin_line(step: str, note: str = "") -> str:
    """The line that says ``step`` began (``note``: e.g. its time budget)."""
    return f"  … {step}" + (f" ({note})" if note else "")


def end_line(step: str, seconds: Any) -> str:
    """The line that says ``step`` ended after ``seconds``."""
    return f"    {step}: {_num(seconds)}s"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Steps:
    """The steps of one call (``what``, e.g. ``"register digits"``), said to ``progress`` (module docstring)."""

    def __init__(self, progress: Say | bool | None, what: str) -> None:
        self.what = what
        self.seconds: dict[str, float] = {}
        self._lines = callable(progress)  # a caller's sink gets the begin and end lines; stderr one per step
        self._say: Say | None = progress if callable(progress) else None if progress is False else _stderr

    @classmethod
    def of(cls, progress: Progress, what: str) -> Steps:
        """The steps of a call given ``progress=``: that object itself when it is a :class:`Steps`."""
        return progress if isinstance(progress, Steps) else cls(progress, what)

    @contextmanager
    def step(self, name: str, note: str = "") -> Iterator[None]:
        """Time the block as step ``name``; its seconds go to :attr:`seconds`, its lines to the sink."""
        if self._lines:
            self._emit(begin_line(name, note))
        t0 = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            took = time.perf_counter() - t0
            self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 3)
            tail = " (failed)" if failed else ""
            self._emit(end_line(name, round(took, 2)) + tail if self._lines
                       else f"kit {self.what}: {name} {took:.1f}s{tail}")

    def meter(self, step: str, what: str) -> Callable[[int, int], None] | None:
        """A byte meter for a transfer inside ``step`` (``what``: e.g. the object's key), to call as
        ``meter(bytes done, bytes total)``: to a caller's sink, a line ``"  … upload: KEY 12.0 of 403.0 MB
        (2%)"`` at most every half second and when done; on a terminal's stderr (the default), one updating
        line (a tqdm bar when tqdm is importable); None where nothing would show it (``progress=False``, or
        stderr not a terminal: the step's end line says its seconds)."""
        if self._say is None:
            return None
        if self._lines:
            return _LineMeter(lambda line: self._emit(line), step, what)
        if self._say is _stderr and _isatty(sys.stderr):
            return _TerminalMeter(what)
        return None

    def _emit(self, line: str) -> None:
        if self._say is None:
            return
        try:
            self._say(line)
        except Exception:  # a broken progress sink must not break what it reports on
            log.warning("progress of %s: the progress callback failed; no more lines", self.what, exc_info=True)
            self._say = None


Progress = Say | bool | Steps | None  # what a call's ``progress=`` takes (module docstring)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class _LineMeter:
    """Byte progress as lines to a sink: one at most every ``every`` seconds, and the last one."""

    def __init__(self, say: Say, step: str, what: str, every: float = 0.5) -> None:
        self.say, self.step, self.what, self.every = say, step, what, every
        self.last = -every

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        pct = 100 * done // total if total else 100
        self.say(f"  … {self.step}: {self.what} {_mb(done)} of {_mb(total)} MB ({pct}%)")


class _TerminalMeter:
    """Byte progress on a terminal's stderr: a tqdm bar when tqdm is importable (never a dependency), else one
    line rewritten in place; finished with a newline when the transfer is whole."""

    def __init__(self, what: str) -> None:
        self.what, self.shown, self.bar, self.closed = what, 0, None, False
        self.last = 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True)

    def __call__(self, done: int, total: int) -> None:
        if self.closed:
            return
        try:
            self._show(done, total)
        except Exception:  # a terminal gone (closed pipe, broken tqdm) never breaks the transfer
            log.debug("progress of %s: the terminal meter failed", self.what, exc_info=True)
            self.closed = True

    def _show(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.shown)
            self.shown = done
            if done >= total:
                self.bar.close()
                self.closed = True
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        pct = 100 * done // total if total else 100
        sys.stderr.write(f"\r{self.what}: {_mb(done)} of {_mb(total)} MB ({pct}%)"
                         + ("\n" if done >= total else ""))
        sys.stderr.flush()
        self.closed = done >= total
