"""JSON log lines: one per request from ``kit.serving.access``, and every other record as JSON too.

The library only defines the formatter; the generated ``wsgi.py`` (the edge) installs it on stderr.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

ACCESS_LOGGER = "kit.serving.access"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "pid", ...record.kit}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
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


def configure_json_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> logging.Handler:
    """Send ``kit.*`` records to ``stream`` (stderr) as JSON lines. Called by a service's wsgi.py."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kit")
    for h in list(logger.handlers):
        if isinstance(h.formatter, JsonFormatter):
            logger.removeHandler(h)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
