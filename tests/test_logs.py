"""Logging: text and JSON lines on stderr with the job, worker and chunk ids, and never a password."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import run_cli
from crawler import logs
from crawler.errors import DatabaseError
from crawler.ledger.database import LedgerConnection
from crawler.logs import log_context, mask_secrets, setup_logging

pytestmark = pytest.mark.one_server


class Captured:
    """What the crawler's handler wrote to stderr (it writes to sys.stderr as it is at each call)."""

    def __init__(self, capsys) -> None:
        self._capsys, self._text = capsys, ""

    def getvalue(self) -> str:
        self._text += self._capsys.readouterr().err
        return self._text


@pytest.fixture
def stderr(capsys, monkeypatch):
    """Capture what the crawler's handler writes; restore the root logger afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # setup_logging exports these for spawned workers; setting them here first makes monkeypatch
    # restore them, so no later test's subprocess inherits a format chosen here.
    monkeypatch.setenv("CRAWLER_LOG_LEVEL", os.environ.get("CRAWLER_LOG_LEVEL", "WARNING"))
    monkeypatch.setenv("CRAWLER_LOG_FORMAT", os.environ.get("CRAWLER_LOG_FORMAT", "text"))
    yield Captured(capsys)
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(captured: Captured) -> list[str]:
    return captured.getvalue().splitlines()


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql://crawler:hunter2@db:5432/crawler", "postgresql://crawler:***@db:5432/crawler"),
        ("postgres://u:p%40ss@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # a raw @ in the password
        ("postgresql://:onlypass@h/db", "postgresql://:***@h/db"),
        ("at postgresql://a:b@h1/x and http://c:d@h2/y.", "at postgresql://a:***@h1/x and http://c:***@h2/y."),
        ("host=db user=crawler password=hunter2 dbname=x", "host=db user=crawler password=*** dbname=x"),
        ("dbname=x password='two words'", "dbname=x password=***"),
        (
            "postgresql://h/db?user=u&password=hunter2&sslmode=disable",
            "postgresql://h/db?user=u&password=***&sslmode=disable",
        ),
    ],
)
def test_passwords_are_masked(text, masked):
    assert mask_secrets(text) == masked
    assert mask_secrets(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://crawler@db:5432/crawler",
        "postgresql://db:5432/crawler",
        "http://127.0.0.1:8080/ok/1",
        "mail me at someone@example.com",
        "fetched 10/20 at 3.0/s",
    ],
)
def test_text_without_a_password_is_left_alone(text):
    assert mask_secrets(text) == text


def test_text_format_with_ids_and_no_password(stderr):
    setup_logging("INFO", "text")
    log = logging.getLogger("crawler.test")
    log.info("connecting to %s", "postgresql://me:hunter2@db/x")
    with log_context(job=3, worker="box:12"):
        log.warning("lost the lease on chunk %d", 9, extra={"chunk": 9})
    first, second = lines(stderr)
    assert first.endswith("INFO crawler.test: connecting to postgresql://me:***@db/x")
    assert second.endswith("WARNING crawler.test: lost the lease on chunk 9 [job=3 worker=box:12 chunk=9]")
    assert "hunter2" not in stderr.getvalue()


def test_json_format_is_one_object_per_line_with_ids(stderr):
    setup_logging("DEBUG", "json")
    log = logging.getLogger("crawler.fetch.worker")
    with log_context(job=3, worker="box:12"):
        log.debug("leased chunk %d", 4, extra={"chunk": 4})
        with log_context(chunk=5):
            log.info("done")
    logging.getLogger("crawler.other").error("plain")
    records = [json.loads(line) for line in lines(stderr)]
    assert [r["msg"] for r in records] == ["leased chunk 4", "done", "plain"]
    assert records[0] | {"ts": None, "pid": None} == {
        "ts": None,
        "level": "debug",
        "logger": "crawler.fetch.worker",
        "pid": None,
        "msg": "leased chunk 4",
        "job": 3,
        "worker": "box:12",
        "chunk": 4,
    }
    assert (records[1]["job"], records[1]["chunk"]) == (3, 5)
    assert not {"job", "worker", "chunk"} & records[2].keys()
    assert records[0]["ts"].endswith("+00:00") and "T" in records[0]["ts"]


def test_json_masks_arguments_exceptions_and_ids(stderr):
    setup_logging("INFO", "json")
    log = logging.getLogger("crawler.test")
    try:
        raise ConnectionError("cannot reach postgresql://me:hunter2@db/x")
    except ConnectionError as exc:
        log.exception("database gone: %r", exc, extra={"worker": "postgresql://w:hunter2@h/db"})
    log.warning("%(dsn)s is in use", {"dsn": "postgresql://me:hunter2@db/x"})
    out = stderr.getvalue()
    assert "hunter2" not in out
    error, warning = (json.loads(line) for line in lines(stderr))
    assert error["msg"] == "database gone: ConnectionError('cannot reach postgresql://me:***@db/x')"
    assert "Traceback" in error["exc"] and "postgresql://me:***@db/x" in error["exc"]
    assert error["worker"] == "postgresql://w:***@h/db"
    assert warning["msg"] == "postgresql://me:***@db/x is in use"


def test_text_tracebacks_are_masked_too(stderr):
    setup_logging("INFO", "text")
    try:
        raise RuntimeError("password=hunter2")
    except RuntimeError:
        logging.getLogger("crawler").exception("failed")
    assert "hunter2" not in stderr.getvalue() and "RuntimeError: password=***" in stderr.getvalue()


async def test_log_context_tags_records_in_tasks_started_inside_it(stderr):
    setup_logging("INFO", "json")
    log = logging.getLogger("crawler.fetch.worker")

    async def fetch_chunk(n: int) -> None:
        with log_context(chunk=n):
            await asyncio.sleep(0)
            log.info("chunk done")

    with log_context(job=8, worker="box:1"):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fetch_chunk(1))
            tg.create_task(fetch_chunk(2))
        log.warning("explicit wins", extra={"job": 9})
    log.info("outside")
    records = [json.loads(line) for line in lines(stderr)]
    tagged = sorted((r["job"], r["worker"], r["chunk"]) for r in records[:2])
    assert tagged == [(8, "box:1", 1), (8, "box:1", 2)]
    assert (records[2]["job"], records[2]["worker"]) == (9, "box:1") and "chunk" not in records[2]
    assert not {"job", "worker", "chunk"} & records[3].keys()


def test_the_handler_follows_sys_stderr(monkeypatch):
    """The live progress display swaps sys.stderr while it runs; log lines must go through it."""
    handler = logs.make_handler("text")
    first, second = io.StringIO(), io.StringIO()
    record = logging.LogRecord("crawler", logging.WARNING, __file__, 1, "hello", (), None)
    monkeypatch.setattr(sys, "stderr", first)
    handler.handle(record)
    monkeypatch.setattr(sys, "stderr", second)
    handler.handle(record)
    assert "hello" in first.getvalue() and "hello" in second.getvalue()


def test_workers_inherit_level_and_format(stderr):
    setup_logging("info", "json")
    assert (os.environ["CRAWLER_LOG_LEVEL"], os.environ["CRAWLER_LOG_FORMAT"]) == ("INFO", "json")
    logging.getLogger().handlers[:] = []
    logs.setup_worker_logging()
    logging.getLogger("crawler.fetch.worker").info("from a worker")
    assert json.loads(lines(stderr)[-1])["msg"] == "from a worker"


def test_cli_json_logs_never_show_the_password(session_dsn, tmp_path):
    """A real crawl with --log-format json and a DSN that carries a password (the test server
    trusts local connections, so any password connects): nothing it prints shows the password;
    then a DSN that cannot connect, which ends in the one-line error with the password masked.
    The JSON records of an outage are checked in-process below."""
    path = tmp_path / "urls.txt"
    path.write_text("http://127.0.0.1:1/refused\n")
    parts = urlsplit(session_dsn)
    user = parts.username or "postgres"
    netloc = f"{user}:hunter2@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    dsn = urlunsplit(parts._replace(netloc=netloc))
    # A host whose robots.txt cannot be fetched: its worker logs that it tries again, a record
    # (a crawl that goes well logs none).
    proc = run_cli(
        "crawl",
        str(path),
        "--dsn",
        dsn,
        "--log-level",
        "DEBUG",
        "--log-format",
        "json",
        "--allow-net",
        "127.0.0.0/8",
        "--max-attempts",
        "2",
        "--robots",
        "obey",
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "hunter2" not in err
    # What a crawl prints besides its records (progress, the summary) is no JSON and no secret either.
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("robots.txt of http://127.0.0.1:1" in record["msg"] for record in records), err
    assert all(record.keys() >= {"ts", "level", "logger", "msg"} for record in records)

    gone = run_cli(
        "crawl",
        str(path),
        "--dsn",
        "postgresql://me:hunter2@127.0.0.1:1/db",
        "--log-level",
        "DEBUG",
        "--log-format",
        "json",
        env={"CRAWLER_DB_OUTAGE_LIMIT": "1"},
    )
    err = gone.stderr.decode()
    assert gone.returncode == 2 and "hunter2" not in err
    assert err.strip().splitlines()[-1].startswith("crawler: cannot connect to PostgreSQL at postgresql://me:***@")


async def test_the_outage_warning_names_the_database_without_its_password(stderr, tmp_path):
    setup_logging("INFO", "json")
    gone = f"postgresql://me:hunter2@/postgres?host={tmp_path}/no-server-here"
    async with LedgerConnection(gone, outage_limit=0.3, job="weekly") as db:
        with pytest.raises(DatabaseError):
            await db.run(lambda conn: conn.fetchval("SELECT 1"))
    records = [json.loads(line) for line in lines(stderr)]
    warnings = [r["msg"] for r in records if r["msg"].startswith("database unavailable")]
    assert warnings and all("me:***@" in m and "hunter2" not in m for m in warnings), records
