"""Process helpers: a free port, waiting for an HTTP endpoint, stopping a process group, whether a process
is alive, a log tail.

The one set of them: :mod:`kit.servicegen` (start a generated service, wait for ``/readyz``, stop it),
:mod:`kit.pack.verify` (``run.sh start`` an unpacked archive), :mod:`kit.fleet` and the tests that start real
nginx, prometheus and gunicorn processes. No torch, no third-party imports.
"""

from __future__ import annotations

import errno
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


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes holding a listening TCP socket on ``port`` (Linux ``/proc``;
    empty elsewhere, or for processes of other users this one may not look into)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    found = []
    for proc in Path("/proc").iterdir() if inodes else ():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmd = " ".join((proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                found.append((int(proc.name), cmd))
        except OSError:
            continue
    return sorted(found)


def refuse_taken_port(host: str, port: int) -> None:
    """Raise :class:`ServiceError` naming what holds ``host:port`` if it cannot be bound (say, orphaned
    workers of a killed service); return quietly when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no holder
        try:
            s.bind((host, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # gunicorn reports other bind errors itself
    holders = port_holders(port)
    who = "; ".join(f"pid {pid} ({cmd[:80]})" for pid, cmd in holders[:4]) or "a process this user cannot see"
    pids = " ".join(str(pid) for pid, _ in holders) or "<pid>"
    raise ServiceError(f"{host}:{port} is already in use by {who}. Stop it (kill {pids}) or bind elsewhere "
                       "(KIT_BIND=host:port).")

