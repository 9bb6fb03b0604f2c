"""Structured logs: one JSON object per line, with the job id and attempt when known.

`log.info("job started", extra={"job_id": ..., "attempt": ...})` adds those fields; the
API and the dispatcher call `configure_logging()` once at start-up.
"""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_FIELDS = (
    "job_id", "attempt", "sweep_id", "project_id", "worker", "state", "reason", "status", "method", "path", "duration_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | None = None) -> None:
    """JSON lines on stderr for the `unroll` loggers, at `level` or the settings' log_level
    (UNROLL_LOG_LEVEL, default info)."""
    from service.store.settings import get_settings

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("unroll")
    logger.handlers[:] = [handler]
    logger.setLevel((level or get_settings().log_level).upper())
    logger.propagate = False


def ensure_logging() -> None:
    """configure_logging() unless the process has configured the `unroll` loggers already
    (the API calls this when its app is built; a test's or an embedding program's own
    handlers are kept)."""
    if not logging.getLogger("unroll").handlers:
        configure_logging()
