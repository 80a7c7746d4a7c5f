"""Logging for the supervisor and worker processes: one line per record on stderr, as text or as
JSON objects carrying the job, worker and chunk ids of the record when it has them. Never a
secret: every message, argument and traceback passes through SecretFilter before it is written."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

IDS = ("job", "worker", "chunk")

# user:password@ in any URL (postgresql://, http://, …): the password runs to the last @ of the
# authority, as urllib reads it, so a password with a raw @ is masked whole.
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.\-]*://[^:/?#@\s]*:)([^/?#\s]*)@")
# password=… in a libpq keyword DSN ("host=db password=secret") or a query string (?password=…).
_KEYWORD_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]+)")


def mask_secrets(text: str) -> str:
    """`text` with every DSN password replaced by ***."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    if "=" in text:
        text = _KEYWORD_PASSWORD.sub(r"\1***", text)
    return text


class SecretFilter(logging.Filter):
    """Renders each record's message with its arguments, then masks it; does the same to its
    traceback and to string ids, so no formatter downstream can print a password."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what logging would show, masked
            message = f"{record.msg} {record.args}"
        record.msg, record.args = mask_secrets(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        for key in IDS:
            value = getattr(record, key, None)
            if isinstance(value, str):
                setattr(record, key, mask_secrets(value))
        return True


# Ids bound for the current context (a worker process, an asyncio task): a task copies the
# context it was created in, so log_context once at the top of a worker tags everything below.
# The default is read-only: it is shared by every context that has set nothing.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "crawler_log_ids", default=MappingProxyType({})
)


class ContextFilter(logging.Filter):
    """Adds the context's ids to a record that does not carry them already (extra= wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


@contextlib.contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Tag every record logged inside the block (and in tasks started from it) with these ids."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key) for key in IDS if getattr(record, key, None) is not None}


class TextFormatter(logging.Formatter):
    """`2024-05-01 12:00:00,123 WARNING crawler.fetch.worker: message [job=3 worker=host:123]`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _ids(record)
        if not ids:
            return line
        tag = " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        first, sep, rest = line.partition("\n")  # ids on the message line, before any traceback
        return first + tag + sep + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, pid, msg, the ids, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        entry.update(_ids(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return orjson.dumps(entry, default=str).decode()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so that the live progress display, which
    takes sys.stderr over while it runs, prints log lines above itself instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler assigns it; the property decides
        pass


def make_handler(fmt: str = "text") -> logging.Handler:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretFilter())  # last: masks what the context added too
    return handler


def setup_logging(level: str = "WARNING", fmt: str = "text") -> None:
    """Log to stderr at `level` as `fmt` ("text" or "json"); spawned workers inherit both."""
    os.environ["CRAWLER_LOG_LEVEL"] = level.upper()
    os.environ["CRAWLER_LOG_FORMAT"] = fmt
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt)]
    root.setLevel(level.upper())


def setup_worker_logging() -> None:
    setup_logging(os.environ.get("CRAWLER_LOG_LEVEL", "WARNING"), os.environ.get("CRAWLER_LOG_FORMAT", "text"))
