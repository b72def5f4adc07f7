"""JSON log lines: one per request from ``kit.serving.access``, and every other record as JSON too.

The library defines the formatter and the request-line writer; the generated ``app.py`` (the edge)
installs them on stderr with :func:`configure_json_logging`.

Request lines skip ``logging``: a ``LogRecord``, a handler lock, a formatter and a write plus flush per
request cost ~35 us, a fifth of a small model's whole request on the event loop. :class:`AccessLog`
builds the same JSON line with orjson and writes the lines of one event-loop pass together, at the end of
that pass (under the handler's lock, so they never interleave with other records). Without
:func:`configure_json_logging` (the ASGI test client, a library user's own logging) request lines go
through the ``kit.serving.access`` logger as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import IO

import orjson

from kit._types import JSONObject

ACCESS_LOGGER = "kit.serving.access"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "pid", ...record.kit}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: JSONObject = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        extra = getattr(record, "kit", None)
        if extra:
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class AccessLog:
    """Request lines, batched per event-loop pass, written through ``handler``'s stream and lock."""

    def __init__(self, handler: logging.StreamHandler):
        self.handler = handler
        self._lines: list[bytes] = []
        self._second = -1
        self._stamp = ""

    def _ts(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def write(self, fields: JSONObject) -> None:
        doc = {"ts": self._ts(time.time()), "level": "INFO", "logger": ACCESS_LOGGER, "msg": "request",
               "pid": os.getpid(), **fields}
        self._lines.append(orjson.dumps(doc, default=str))
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # not on an event loop: write now
                self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = (b"\n".join(self._lines) + b"\n").decode()
        self._lines.clear()
        self.handler.acquire()
        try:
            self.handler.stream.write(text)
            self.handler.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: a request line is not worth a failed request
            pass
        finally:
            self.handler.release()


_ACCESS: AccessLog | None = None


def log_access(fields: JSONObject) -> None:
    """One request line: through :class:`AccessLog` once a service configured it, else ``logging``."""
    if _ACCESS is not None:
        _ACCESS.write(fields)
    else:
        logging.getLogger(ACCESS_LOGGER).info("request", extra={"kit": fields})


def configure_json_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> logging.Handler:
    """Send ``kit.*`` records to ``stream`` (stderr) as JSON lines, request lines through :class:`AccessLog`.
    Called by a service's app.py."""
    global _ACCESS
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kit")
    for h in list(logger.handlers):
        if isinstance(h.formatter, JsonFormatter):
            logger.removeHandler(h)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    _ACCESS = AccessLog(handler) if level <= logging.INFO else None
    return handler
