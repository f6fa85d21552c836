"""One log format for everything the host process prints: ours, uvicorn's, its access log.

``text`` (default): ``2026-11-30T13:44:20Z INFO infenclave.host: message``. ``json``: one
object per line, ``{"time", "level", "logger", "message"}`` (plus ``exception`` when there is
one), for log shippers. uvicorn's own handlers are not installed (``log_config=None``), so its
``uvicorn.error`` and ``uvicorn.access`` records reach the same root handler.

Enclave workers write their own lines to stderr (``enclave[PID]: ...``); they are not
reformatted here, because under Gramine that stream is the channel and the host never parses
what an enclave writes outside it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "configure_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z"


class _JsonFormatter(_UtcFormatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send every logger to one stderr handler in *fmt*, at *level* (checked by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else _UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
