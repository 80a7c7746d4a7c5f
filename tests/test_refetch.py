"""`crawler retry`: which rows it chooses (pure), and a finished job with timeouts and 503s fetched
again once the servers answer, with the job's policy: one result per row, attempts added to,
counts and the export consistent; interrupted, `resume` finishes it."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_cli, test_settings
from crawler.errors import EXIT_OK, UsageError
from crawler.job.crawl import crawl, resume, retry
from crawler.job.refetch import ALL_STATUSES, TRANSIENT_KINDS, parse_statuses, selection
from crawler.ledger.chunks import chunk_requests, lease_chunk, mark_ingested, open_chunks, store_chunk
from crawler.ledger.jobs import create_job, find_job, job_counts, set_job_state
from crawler.ledger.reruns import Reopened, reopen_for_retry
from crawler.ledger.results import ResultRow, finish_job, write_results
from crawler.ledger.summary import job_summary
from crawler.settings import Settings

# --- the selection ------------------------------------------------------------------------------


def test_by_default_the_transient_kinds_and_the_statuses_the_job_retries() -> None:
    chosen = selection(None, None, [429, 503])
    assert chosen.kinds == frozenset(TRANSIENT_KINDS)
    assert chosen.statuses == ((429, 429), (503, 503))


def test_kinds_replace_the_default_and_status_picks_http_answers() -> None:
    assert selection("timeout", None, [503]) == (frozenset({"timeout"}), ())
    assert selection("timeout,http_status", None, [503]) == (frozenset({"timeout"}), (ALL_STATUSES,))
    assert selection("internal", "5xx,404", [503]) == (frozenset({"internal"}), ((404, 404), (500, 599)))
    assert selection(None, "500", [503]).statuses == ((500, 500),)


@pytest.mark.parametrize(
    "kinds, statuses, fragment",
    [
        ("timeout,slow", None, "'slow' in --kinds is not an error kind"),
        (",", None, "in --kinds is not an error kind"),
        (None, "5x", "'5x' in --status"),
        (None, "600", "'600' in --status"),
        (None, "503,", "'' in --status"),
    ],
)
def test_a_bad_selection_is_one_sentence(kinds, statuses, fragment) -> None:
    with pytest.raises(UsageError) as caught:
        selection(kinds, statuses, [503])
    assert fragment in str(caught.value) and str(caught.value).endswith(".")


@given(st.lists(st.integers(100, 599) | st.sampled_from(["1xx", "2xx", "3xx", "4xx", "5xx"]), min_size=1))
def test_a_status_is_chosen_exactly_when_one_of_the_items_names_it(items) -> None:
    ranges = parse_statuses(",".join(map(str, items)))
    for code in range(100, 600):
        named = any(item == code or (isinstance(item, str) and str(code)[0] == item[0]) for item in items)
        assert named == any(lo <= code <= hi for lo, hi in ranges)


# --- a job fetched again ------------------------------------------------------------------------


@pytest.fixture
async def slow_then_answering(aiohttp_server):
    """/slow/.. takes longer than the job's timeout until `answering` is set, then answers 200."""
    answering = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if not answering.is_set():
            try:
                await asyncio.wait_for(answering.wait(), 3)
            except TimeoutError:
                pass
        return web.Response(text="late but here")

    app = web.Application()
    app.router.add_get("/slow/{i}", slow)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", answering


async def results(db, job_id: int) -> dict[int, dict]:
    return {
        r["row_no"]: dict(r)
        for r in await db.fetch(
            "SELECT row_no, status, error_kind, attempts, cache_kind FROM results WHERE job_id = $1", job_id
        )
    }


async def test_retry_fetches_the_timeouts_and_503s_again_with_the_jobs_policy(
    session_dsn, db, mock_url, slow_then_answering, tmp_path
):
    slow_base, answering = slow_then_answering
    urls = (
        [f"{mock_url}/ok/{i}" for i in range(50)]  # rows 1-50: 200
        + [f"{mock_url}/flaky/2/a{i}" for i in range(20)]  # 51-70: 503 twice, then 200
        + [f"{mock_url}/flaky/10/b{i}" for i in range(10)]  # 71-80: 503 all along
        + [f"{slow_base}/slow/{i}" for i in range(10)]  # 81-90: timeouts, then 200
        + [f"{mock_url}/status/404" for _ in range(5)]  # 91-95: 404 (92-95 duplicates of 91)
        + [f"{mock_url}/flaky/2/a0"]
    )  # 96: a duplicate of row 51
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    rows = len(urls)
    policy = test_settings(max_attempts=2, total_timeout=0.4, chunk_size=30)
    code = await crawl(
        session_dsn, policy, input_path=str(path), url_column=None, job_name="retry-me", summary_json=None, quiet=True
    )
    assert code == EXIT_OK
    job = await find_job(db, "retry-me")
    first = await results(db, job.id)
    assert [first[r]["status"] for r in (51, 71, 96)] == [503, 503, 503]
    assert {first[r]["error_kind"] for r in range(81, 91)} == {"timeout"}
    assert {first[r]["attempts"] for r in range(51, 91)} == {2}

    answering.set()
    # This machine's own settings: default policy (3 attempts, no networks allowed); the job's
    # own (2 attempts, loopback allowed) must apply.
    here = Settings(workers=2, concurrency=20, home="/nonexistent", progress_interval=3600.0)
    code = await retry(
        session_dsn,
        here,
        job_ref="retry-me",
        kinds=None,
        statuses=None,
        summary_json=str(tmp_path / "summary.json"),
        quiet=True,
    )
    assert code == EXIT_OK
    run = json.loads((tmp_path / "summary.json").read_text())
    assert round(run["requests_per_s"] * run["elapsed_s"]) == 40  # this run's rate: its 40 requests
    job = await find_job(db, "retry-me")
    assert job.state == "done"
    again = await results(db, job.id)
    assert sorted(again) == list(range(1, rows + 1))  # exactly one result per row
    assert {(again[r]["status"], again[r]["attempts"]) for r in range(51, 71)} == {(200, 3)}  # 2 + 1
    assert {(again[r]["status"], again[r]["attempts"]) for r in range(71, 81)} == {(503, 4)}  # 2 + 2, not 2 + 3
    assert {(again[r]["status"], again[r]["attempts"]) for r in range(81, 91)} == {(200, 3)}
    assert all(again[r] == first[r] for r in [*range(1, 51), *range(91, 96)])  # not chosen: untouched
    assert (again[96]["status"], again[96]["cache_kind"]) == (200, "duplicate")  # shares row 51's new outcome

    counts = await job_counts(db, job.id)
    summary = await job_summary(db, job.id)
    assert counts.fetched == counts.to_fetch == rows - 5  # five duplicates
    assert (counts.ok, counts.failed) == (80, 11)  # of the fetched rows, 10 x 503 and one 404 failed
    assert (summary["ok"], summary["failed"], summary["rows"]) == (81, 15, rows)
    assert await db.fetchval("SELECT count(*) FROM retried WHERE job_id = $1", job.id) == 0

    exported = run_cli("export", "retry-me", "--dsn", session_dsn, "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr.decode()
    records = {r["row"]: r for r in map(json.loads, exported.stdout.decode().splitlines())}
    assert sorted(records) == list(range(1, rows + 1))
    assert (records[60]["status"], records[60]["attempts"], records[60]["error_kind"]) == (200, 3, None)
    assert (records[75]["status"], records[75]["attempts"], records[75]["error_kind"]) == (503, 4, "http_status")

    # Nothing left of a kind: nothing to do. A retry cut short is finished by resume, which adds
    # the attempts the same way (reopened here as a retry interrupted before it fetched would be).
    nothing = run_cli("retry", "retry-me", "--dsn", session_dsn, "--kinds", "timeout", "--workers", "1")
    assert nothing.returncode == 0 and "nothing to fetch again" in nothing.stderr.decode()
    changed = run_cli("retry", "retry-me", "--dsn", session_dsn, "--max-attempts", "9", "--workers", "1")
    assert changed.returncode == 1 and changed.stderr.decode().startswith("crawler: --max-attempts (the job has")
    reopened = await reopen_for_retry(db, job.id, kinds=[], statuses=[(503, 503)])
    assert reopened == Reopened(rows=10, fetches=10, chunks=1)
    assert (await job_counts(db, job.id)).fetched == rows - 5 - 10
    await set_job_state(db, job.id, "interrupted")
    refused = run_cli("retry", "retry-me", "--dsn", session_dsn)
    assert refused.returncode == 1 and "`crawler resume retry-me` finishes it" in refused.stderr.decode()
    assert await resume(session_dsn, here, job_ref="retry-me", summary_json=None, quiet=True) == EXIT_OK
    last = await results(db, job.id)
    assert {(last[r]["status"], last[r]["attempts"]) for r in range(71, 81)} == {(503, 6)}
    assert (await job_counts(db, job.id)).fetched == rows - 5


async def test_a_retried_answer_this_job_cached_is_asked_again_not_served_from_the_cache(db):
    from crawler.job.inputs import RequestRow
    from crawler.urls import fingerprint

    job = await create_job(db, name="retry-cached", input="test", settings={})
    urls = ["http://example.test/gone", "http://example.test/here"]
    rows = [RequestRow(i + 1, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)]
    await store_chunk(db, job.id, 0, rows)
    await mark_ingested(db, job.id)
    chunk = await lease_chunk(db, job.id, "w", 60)
    answers = [
        ResultRow(job.id, 1, 404, urls[0], "http_status", "HTTP 404", 1, False, 1.0, 0, None, None),
        ResultRow(job.id, 2, 200, urls[1], None, None, 1, False, 1.0, 0, None, None),
    ]
    await write_results(
        db,
        job.id,
        {chunk.lease: answers},
        {chunk.lease},
        60,
        cache_rows=[
            (r.fingerprint, s, r.url, 0, None, None, None, job.id) for r, s in zip(rows, (404, 200), strict=True)
        ],
    )
    await db.execute("UPDATE response_cache SET job_id = 0 WHERE fingerprint = $1", rows[1].fingerprint)
    assert await finish_job(db, job.id)
    assert await reopen_for_retry(db, job.id, kinds=[], statuses=[(404, 404)]) == (1, 1, 1)
    cached = {
        r["fingerprint"]
        for r in await db.fetch(
            "SELECT fingerprint FROM response_cache WHERE fingerprint = ANY($1::bytea[])", [r.fingerprint for r in rows]
        )
    }
    assert cached == {rows[1].fingerprint}
    assert (
        await chunk_requests(db, job.id, await lease_chunk(db, job.id, "w", 60)) and await open_chunks(db, job.id) == 1
    )
