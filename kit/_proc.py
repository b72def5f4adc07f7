"""Process helpers: a free port, waiting for an HTTP endpoint, stopping a process group, whether a process
is alive, a log tail.

The one set of them: :mod:`kit.servicegen` (start a generated service, wait for ``/readyz``, stop it),
:mod:`kit.pack.verify` (``run.sh start`` an unpacked archive), :mod:`kit.fleet` and the tests that start real
nginx, prometheus and gunicorn processes. No torch, no third-party imports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kit.errors import KitError, ServiceError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def wait_http(url: str, *, timeout: float = 30.0, ok: Callable[[int, bytes], bool] | None = None,
              process: subprocess.Popen[bytes] | None = None, log_path: Path | None = None,
              what: str = "", error: type[KitError] = ServiceError) -> float:
    """Poll ``url`` until ``ok(status, body)`` (default: status 200); returns the seconds waited.

    Raises ``error`` (default :class:`ServiceError`) with the log tail when ``process`` exits first or time
    runs out; ``what`` names the process in that message (default: "The process behind <url>").
    """
    ok = ok or (lambda status, _body: status == 200)
    t0 = time.monotonic()
    last: tuple[int, bytes] = (0, b"")
    while time.monotonic() - t0 < timeout:
        if process is not None and process.poll() is not None:
            raise error(f"{what or 'The process behind ' + url} exited with code {process.returncode} before "
                        f"{url} answered. Log tail ({log_path}):\n{tail(log_path)}")
        last = http_status(url, timeout=2.0)
        if ok(*last):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise error(f"{url} did not answer as expected within {timeout:.0f}s (last: {last[0]} {last[1][:300]!r}). "
                f"Log tail ({log_path}):\n{tail(log_path)}")


def stop_group(process: subprocess.Popen[bytes], *, timeout: float = 10.0,
               sig: signal.Signals = signal.SIGTERM, whole_group: bool = False) -> int | None:
    """Send ``sig`` to the process (started with ``start_new_session=True``; to its whole group with
    ``whole_group``, for a shell script whose children must hear it too), then SIGKILL the group after
    ``timeout`` seconds, so no child outlives it. Returns the exit code."""
    if process.poll() is None:
        try:
            if whole_group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return process.returncode


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (one of another user's counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path | str | None, n: int = 25) -> str:
    """The last ``n`` lines of a log file ("" when there is none)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-n:])
