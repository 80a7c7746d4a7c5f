"""Logging set-up for the supervisor and worker processes: one line per record on stderr,
as text or as JSON objects; never a secret (DSNs are masked before they are logged)."""

from __future__ import annotations

import logging
import os
import sys

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key in ("job", "worker", "chunk"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str = "WARNING", fmt: str = "text") -> None:
    os.environ["CRAWLER_LOG_LEVEL"] = level.upper()  # inherited by spawned workers
    os.environ["CRAWLER_LOG_FORMAT"] = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_worker_logging() -> None:
    setup_logging(os.environ.get("CRAWLER_LOG_LEVEL", "WARNING"), os.environ.get("CRAWLER_LOG_FORMAT", "text"))
