"""What `crawler status`, `crawler jobs` and the summary print of stored text is shown, never
acted on: no control character reaches the terminal, and brackets are not rich markup."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conftest import run_cli
from crawler.job.inputs import RequestRow
from crawler.job.progress import render_summary
from crawler.ledger.chunks import lease_chunk, mark_ingested, store_chunk
from crawler.ledger.jobs import create_job
from crawler.ledger.results import ResultRow, prepare_writer, write_results
from crawler.urls import fingerprint

pytestmark = pytest.mark.one_server

HOSTILE = "[bold red]boom[/]\x1b[2J\x1b]0;owned\x07"
SHOWN = "[bold red]boom[/]\\x1b[2J\\x1b]0;owned\\x07"


def summary(**changes) -> dict:
    values = {
        "job_id": 7,
        "job_name": HOSTILE,
        "state": "done",
        "rows": 1,
        "requests": 1,
        "fetched": 1,
        "from_cache": 0,
        "invalid": 0,
        "ok": 0,
        "failed": 1,
        "retries": 0,
        "elapsed_s": 1.0,
        "requests_per_s": 1.0,
        "time_to_first_fetch_s": None,
        "latency_ms": {"p50": None, "p95": None, "p99": None},
        "statuses": {"500": 1},
        "errors": {"http_status": {"count": 1, "example": f"http://a.test/{HOSTILE}"}},
    }
    values.update(changes)
    return values


def test_the_summary_prints_stored_text_as_written():
    out = io.StringIO()
    render_summary(summary(), Console(file=out, width=200, force_terminal=True, color_system="standard"))
    text = out.getvalue()
    assert f"job 7 ({SHOWN})" in text
    assert f"http://a.test/{SHOWN}" in text
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text


async def test_status_and_jobs_print_stored_text_as_written(session_dsn, db):
    job = await create_job(db, name=HOSTILE, input="test", settings={})
    url = f"http://a.test/{HOSTILE}"
    await store_chunk(db, job.id, 0, [RequestRow(1, "GET", url, fingerprint("GET", url))])
    await mark_ingested(db, job.id)
    lease = (await lease_chunk(db, job.id, "w1", 60)).lease
    await prepare_writer(db)
    record = ResultRow(job.id, 1, 500, url, "http_status", "HTTP 500", 1, False, 1.0, 0, None, None)
    await write_results(db, job.id, {lease: [record]}, {lease}, 60)
    for command in (("status", str(job.id)), ("jobs",)):
        proc = run_cli(*command, "--dsn", session_dsn, env={"COLUMNS": "250"})
        out = proc.stdout.decode()
        assert proc.returncode == 0, proc.stderr.decode()
        assert SHOWN in out, out
        assert "\x1b" not in out and "\x07" not in out
