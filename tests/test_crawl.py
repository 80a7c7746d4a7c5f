"""End-to-end crawls: real worker processes, a real PostgreSQL, the mock server on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.job.signals import unless_signalled


async def hits(mock_url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mock_url}/__hits") as resp:
            return await resp.json()


async def run_crawl(dsn: str, path: Path, *, job_name: str | None = None, **overrides) -> int:
    return await crawl(
        dsn,
        test_settings(**overrides),
        input_path=str(path),
        url_column=None,
        job_name=job_name,
        summary_json=None,
        quiet=True,
    )


async def job_id(db, name: str) -> int:
    return await db.fetchval("SELECT id FROM jobs WHERE name = $1", name)


async def test_csv_crawled_by_two_workers_accounts_for_every_row_once(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "urls.csv"
    lines = ["id,url,note"]
    for i in range(3000):
        lines.append(f"{i},{mock_url}/ok/{i % 2400},x")  # 600 duplicates
    lines.insert(100, "bad,notaurl,x")
    lines.insert(2000, "bad2,ftp://example.com/file,x")
    path.write_text("\n".join(lines) + "\n")

    assert await run_crawl(session_dsn, path, job_name="two-workers") == EXIT_OK

    jid = await job_id(db, "two-workers")
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", jid) == "done"
    requests = await db.fetchval("SELECT count(*) FROM requests WHERE job_id = $1", jid)
    results = await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", jid)
    invalid = await db.fetch("SELECT row_no, reason FROM invalid_rows WHERE job_id = $1 ORDER BY row_no", jid)
    assert requests == 3000 and results == 3000
    assert [r["row_no"] for r in invalid] == [100, 2000]
    # every valid row has exactly one result (the primary key makes more impossible; none missing)
    missing = await db.fetchval(
        "SELECT count(*) FROM requests q WHERE q.job_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = q.job_id AND r.row_no = q.row_no)",
        jid,
    )
    assert missing == 0
    cached = await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1 AND from_cache", jid)
    assert cached == 600
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1 AND status = 200", jid) == 3000
    # the server saw each unique URL once
    assert (await hits(mock_url))["total"] == 2400
    # both workers took part: each fetched some of the 2400, and together all of them
    fetched = [
        r["fetched"] for r in await db.fetch("SELECT fetched FROM workers WHERE job_id = $1 ORDER BY worker_id", jid)
    ]
    assert len(fetched) == 2 and min(fetched) > 0 and sum(fetched) == 2400, fetched
    assert await db.fetchval("SELECT count(*) FROM chunks WHERE job_id = $1 AND state <> 'done'", jid) == 0


@pytest.mark.parametrize("kind", ["text", "gzip-text", "gzip-csv", "headerless"])
async def test_text_and_gzip_inputs(session_dsn, db, mock_url, tmp_path, kind):
    urls = [f"{mock_url}/ok/{kind}/{i}" for i in range(250)]
    if kind == "text":
        path = tmp_path / "urls.txt"
        path.write_text("\n".join(urls) + "\n")
    elif kind == "headerless":
        path = tmp_path / "urls.csv"
        path.write_text("\n".join(f'"{u}"' for u in urls) + "\n")
    elif kind == "gzip-text":
        path = tmp_path / "urls.txt.gz"
        path.write_bytes(gzip.compress(("\n".join(urls) + "\n").encode()))
    else:
        path = tmp_path / "urls.csv.gz"
        path.write_bytes(gzip.compress(("url\n" + "\n".join(urls) + "\n").encode()))

    assert await run_crawl(session_dsn, path, job_name=f"input-{kind}") == EXIT_OK

    jid = await job_id(db, f"input-{kind}")
    stored = await db.fetch(
        "SELECT q.url, r.status FROM requests q JOIN results r USING (job_id, row_no) WHERE q.job_id = $1"
        " ORDER BY q.row_no",
        jid,
    )
    assert [r["url"] for r in stored] == urls
    assert {r["status"] for r in stored} == {200}


async def test_invalid_rows_are_recorded_and_the_job_goes_on(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(
        b"url,id\n"
        + f"{mock_url}/ok/1,1\n".encode()
        + b",2\n"  # empty URL
        + b"mailto:someone@example.com,3\n"
        + b"http://"
        + b"a" * 9000
        + b".com/,4\n"
        + b"http://caf\xe9.example/,5\n"  # not UTF-8
        + f"{mock_url}/ok/2,6\n".encode()
    )
    assert await run_crawl(session_dsn, path, job_name="invalid-rows") == EXIT_OK
    jid = await job_id(db, "invalid-rows")
    invalid = await db.fetch("SELECT row_no, reason FROM invalid_rows WHERE job_id = $1 ORDER BY row_no", jid)
    reasons = {r["row_no"]: r["reason"] for r in invalid}
    assert set(reasons) == {2, 3, 4, 5}
    assert "empty" in reasons[2]
    assert "scheme" in reasons[3]
    assert "8 KiB" in reasons[4]
    assert "UTF-8" in reasons[5]
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1 AND status = 200", jid) == 2


async def test_loopback_is_blocked_unless_allowed(session_dsn, db, mock_url, tmp_path):
    host_url = mock_url.replace("127.0.0.1", "localhost")
    path = tmp_path / "blocked.txt"
    path.write_text(
        f"{mock_url}/ok/a\n{host_url}/ok/b\nhttp://[::1]:9/ok/c\nhttp://169.254.169.254/latest/meta-data/\n"
    )
    assert await run_crawl(session_dsn, path, job_name="blocked", allow_net=[]) == EXIT_OK
    jid = await job_id(db, "blocked")
    rows = await db.fetch("SELECT error_kind, error, attempts FROM results WHERE job_id = $1 ORDER BY row_no", jid)
    assert [r["error_kind"] for r in rows] == ["blocked"] * 4
    assert all(r["attempts"] == 1 for r in rows)  # a refusal is not retried
    assert "not allowed" in rows[0]["error"]
    assert (await hits(mock_url))["total"] == 0


async def test_empty_file_is_a_completed_job_with_no_rows(session_dsn, db, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert await run_crawl(session_dsn, path, job_name="empty") == EXIT_OK
    jid = await job_id(db, "empty")
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", jid) == "done"
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", jid) == 0


async def test_statuses_redirects_and_retries_are_stored(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "statuses.txt"
    path.write_text(
        "\n".join(
            [
                f"{mock_url}/status/404",
                f"{mock_url}/status/503",
                f"{mock_url}/redirect/3",
                f"{mock_url}/bytes/5000",
                "http://127.0.0.1:1/refused",
            ]
        )
        + "\n"
    )
    assert await run_crawl(session_dsn, path, job_name="statuses", max_attempts=3) == EXIT_OK
    jid = await job_id(db, "statuses")
    rows = await db.fetch(
        "SELECT status, final_url, error_kind, attempts, body_bytes, length(body_sha256) AS digest"
        " FROM results WHERE job_id = $1 ORDER BY row_no",
        jid,
    )
    not_found, unavailable, redirected, sized, refused = rows
    assert (not_found["status"], not_found["error_kind"], not_found["attempts"]) == (404, "http_status", 1)
    assert (unavailable["status"], unavailable["error_kind"], unavailable["attempts"]) == (503, "http_status", 3)
    assert redirected["status"] == 200 and redirected["final_url"].endswith("/redirect/0")
    assert sized["body_bytes"] == 5000 and sized["digest"] == 32
    assert (refused["error_kind"], refused["attempts"]) == ("connect", 3)


async def test_a_job_name_cannot_be_used_twice(session_dsn, mock_url, tmp_path):
    from crawler.ledger.jobs import JobExists

    path = tmp_path / "one.txt"
    path.write_text(f"{mock_url}/ok/1\n")
    assert await run_crawl(session_dsn, path, job_name="twice") == EXIT_OK
    with pytest.raises(JobExists, match="crawler resume twice"):
        await run_crawl(session_dsn, path, job_name="twice")


async def test_a_corrupt_gzip_stops_with_one_sentence_and_keeps_what_was_read(session_dsn, db, mock_url, tmp_path):
    from crawler.errors import InputError

    body = gzip.compress("".join(f"{mock_url}/ok/gz/{i}\n" for i in range(5000)).encode())
    path = tmp_path / "truncated.txt.gz"
    path.write_bytes(body[: len(body) // 2])
    with pytest.raises(InputError) as caught:
        await run_crawl(session_dsn, path, job_name="truncated-gzip")
    assert "\n" not in str(caught.value)
    jid = await job_id(db, "truncated-gzip")
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", jid) == "interrupted"


def test_a_worker_collects_garbage_rarely_and_never_scans_its_start_up_objects() -> None:
    # In a process of its own, as a worker would: pytest's collector stays as it is.
    code = (
        "import gc, json; from crawler.fetch.process import tune_gc; tune_gc();"
        " print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    threshold, frozen = json.loads(done.stdout)
    assert threshold[0] >= 10_000  # CPython's default is 700: a collection every few requests
    assert frozen > 10_000  # the modules' objects, out of every later scan


@pytest.fixture
def sigint_caught():
    """A SIGINT that no handler of the code under test takes is caught here, not by pytest."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


async def test_a_signal_after_the_crawl_gives_up_what_is_left_and_restores_the_default(sigint_caught):
    started = asyncio.Event()

    async def summary() -> str:
        started.set()
        await asyncio.sleep(30)
        return "read"

    waiting = asyncio.create_task(unless_signalled(summary()))
    await started.wait()
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(waiting, 5) is None
    assert sigint_caught == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_without_a_signal_the_work_after_the_crawl_is_done_and_a_cancel_still_cancels(sigint_caught):
    assert await unless_signalled(asyncio.sleep(0, "read")) == "read"
    waiting = asyncio.create_task(unless_signalled(asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
