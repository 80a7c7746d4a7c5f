"""A chunk that keeps killing its workers is quarantined and the job finishes: the deaths counted
per chunk in the ledger, the lease rule that makes the next death name one chunk, and a crawl
whose workers die on one chunk (the CRAWLER_TEST_EXIT_ON_ROW hook)."""

from __future__ import annotations

import json

from conftest import run_cli, test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.job.inputs import RequestRow
from crawler.job.processes import WorkerProcesses, WorkerSlot
from crawler.ledger.chunks import LeasedChunk, lease_chunk, mark_ingested, store_chunk
from crawler.ledger.jobs import Job, create_job, find_job, job_counts
from crawler.ledger.quarantine import QUARANTINE_AFTER, Quarantine, Released, quarantined_chunks, release_dead_workers
from crawler.ledger.results import ResultRow, finish_job, prepare_writer, write_results
from crawler.ledger.summary import job_summary
from crawler.urls import fingerprint

CHUNK = 10


async def job_with_chunks(db, name: str, chunks: int, *, repeat_last: bool = False) -> Job:
    """A job of `chunks` chunks of CHUNK rows, ingested; with repeat_last, the last row of the
    first chunk repeats its first row (a duplicate)."""
    job = await create_job(db, name=name, input="test", settings={})
    for n in range(chunks):
        urls = [f"http://example.test/{n * CHUNK + i}" for i in range(CHUNK)]
        if repeat_last and n == 0:
            urls[-1] = urls[0]
        rows = [RequestRow(n * CHUNK + i + 1, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)]
        await store_chunk(db, job.id, n, rows)
    await mark_ingested(db, job.id)
    return job


def ok(job_id: int, row_no: int) -> ResultRow:
    return ResultRow(job_id, row_no, 200, "http://a/", None, None, 1, False, 1.0, 2, b"\x00" * 32, None)


async def lease(db, job, owner: str) -> LeasedChunk | None:
    return await lease_chunk(db, job.id, owner, 60)


async def test_three_deaths_in_a_row_quarantine_the_chunk_and_the_job_can_finish(db):
    job = await job_with_chunks(db, "three-deaths", 2, repeat_last=True)
    await prepare_writer(db)
    for death in range(1, QUARANTINE_AFTER + 1):
        chunk = await lease(db, job, f"w{death}")
        assert chunk.lease.chunk_no == 0
        if death == 1:  # the first holder committed two results before it died
            await write_results(db, job.id, {chunk.lease: [ok(job.id, 1), ok(job.id, 2)]}, set(), 60)
        released = await release_dead_workers(db, job.id, [f"w{death}"])
        assert released.held == {f"w{death}": [0]}
        # the first death is the worker's as much as the chunk's; the next ones, the chunk's
        assert released.repeats == (frozenset() if death == 1 else {f"w{death}"})
        assert [q.chunk_no for q in released.quarantined] == ([0] if death == QUARANTINE_AFTER else [])
    q = released.quarantined[0]
    # 10 rows, one a duplicate of row 1: 9 to fetch, 2 fetched, 7 given up
    assert (q.first_row, q.last_row, q.deaths, q.given_up) == (1, 10, 3, 7)
    results = await db.fetch(
        "SELECT row_no, error_kind, error, attempts FROM results WHERE job_id = $1 ORDER BY row_no", job.id
    )
    assert [r["row_no"] for r in results] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert {r["error_kind"] for r in results[2:]} == {"internal"}
    assert "workers died 3 times on this chunk" in results[2]["error"] and results[2]["attempts"] == 0
    counts = await job_counts(db, job.id)
    assert (counts.fetched, counts.ok, counts.failed, counts.done) == (9, 2, 7, 1)
    # the other chunk is finished normally; the job is done and the duplicate shares row 1's outcome
    other = await lease(db, job, "w9")
    await write_results(db, job.id, {other.lease: [ok(job.id, r) for r in range(11, 21)]}, {other.lease}, 60)
    assert await finish_job(db, job.id)
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job.id) == 20
    assert await quarantined_chunks(db, job.id) == [q]
    summary = await job_summary(db, job.id)
    assert summary["quarantined"] == [q._asdict()] and summary["errors"]["internal"]["count"] == 7


async def test_deaths_on_different_chunks_or_none_quarantine_nothing(db):
    job = await job_with_chunks(db, "scattered-deaths", 3)
    for n in range(3):  # three workers, each holding its own chunk
        assert (await lease(db, job, f"w{n}")).lease.chunk_no == n
    for n in range(3):
        released = await release_dead_workers(db, job.id, [f"w{n}"])
        assert released.held == {f"w{n}": [n]} and released.quarantined == []
    for n in range(3):  # and a worker that dies holding nothing names no chunk
        assert await release_dead_workers(db, job.id, [f"idle{n}"]) == Released({}, [])
    deaths = dict(await db.fetch("SELECT chunk_no, deaths FROM chunks WHERE job_id = $1", job.id))
    assert deaths == {0: 1, 1: 1, 2: 1}
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job.id) == 0


async def test_a_chunk_whose_holders_died_goes_to_a_worker_holding_nothing_and_alone(db):
    job = await job_with_chunks(db, "isolation", 4)
    assert [(await lease(db, job, o)).lease.chunk_no for o in ("x", "y", "y")] == [0, 1, 2]
    await release_dead_workers(db, job.id, ["y"])  # chunks 1 and 2 have a death now
    assert (await lease(db, job, "x")).lease.chunk_no == 3  # x holds chunk 0: it skips them
    assert (await lease(db, job, "z")).lease.chunk_no == 1  # z holds nothing: chunk 1 is its...
    assert await lease(db, job, "z") is None  # ...and it gets nothing more while it holds it
    assert await lease(db, job, "x") is None  # x still holds chunks 0 and 3
    assert (await lease(db, job, "w")).lease.chunk_no == 2


def test_a_slot_whose_deaths_repeat_on_poisoned_chunks_keeps_its_restart_budget():
    """Two workers meeting two poisoned chunks in any order: a death on a chunk that had killed
    before is explained at once, whatever is quarantined later; deaths on fresh chunks count."""
    pool = WorkerProcesses("postgresql://unused", test_settings(workers=1, worker_restarts=2))
    slot = WorkerSlot(0)
    pool.slots = [slot]
    pool._slot_of["w1"] = pool._slot_of["w2"] = pool._slot_of["w3"] = slot
    pool._count_deaths(Released({"w1": [6]}, []))  # chunk 6's first death: counted
    pool._count_deaths(Released({"w2": [6]}, [], frozenset({"w2"})))  # its second: explained
    pool._count_deaths(Released({"w3": [2]}, []))  # chunk 2's first death: counted
    slot.restarts = 3
    assert slot.unexplained == 2  # within a budget of 2: the job goes on
    q = Quarantine(6, 61, 70, 3, 10)
    pool._count_deaths(Released({}, [q]))  # chunk 6 quarantined later explains w1's too
    assert slot.unexplained == 1


async def test_a_worker_that_stopped_for_the_database_counts_no_death(db):
    job = await job_with_chunks(db, "blameless", 2)
    await lease(db, job, "gave-up")
    await lease(db, job, "crashed")
    pool = WorkerProcesses("postgresql://unused", test_settings())
    pool._blameless.add("gave-up")  # as reap() notes a worker that exited with EXIT_INFRA
    released = await pool._release(db, job.id, ["gave-up", "crashed"])
    assert released.held == {"crashed": [1]}
    deaths = dict(await db.fetch("SELECT chunk_no, deaths FROM chunks WHERE job_id = $1 AND state = 'pending'", job.id))
    assert deaths == {0: 0, 1: 1}  # both given back, one death counted


async def test_a_chunk_that_kills_its_workers_is_quarantined_and_the_job_ends_done(
    session_dsn, db, mock_url, tmp_path, monkeypatch
):
    rows = 1000
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{mock_url}/ok/{i}\n" for i in range(rows)))
    monkeypatch.setenv("CRAWLER_TEST_EXIT_ON_ROW", "250,660")  # in chunks 2 and 6: rows 201-300, 601-700
    # Six deaths on two slots. Which deaths a quarantine explains, and so leave the restart
    # budget, is the subject of the test above, in every order; here the budget is wide enough
    # that the order in which the workers meet the two chunks never decides the outcome. Leases
    # far longer than the test: a dead worker's chunk left to expire fails it.
    settings = test_settings(restart_backoff=0.05, worker_restarts=5, lease_seconds=3600)
    code = await crawl(
        session_dsn,
        settings,
        input_path=str(path),
        url_column=None,
        job_name="poisoned-chunk",
        summary_json=None,
        quiet=True,
    )
    assert code == EXIT_OK
    job = await find_job(db, "poisoned-chunk")
    assert job.state == "done"
    results = await db.fetch("SELECT row_no, status, error_kind FROM results WHERE job_id = $1 ORDER BY row_no", job.id)
    assert [r["row_no"] for r in results] == list(range(1, rows + 1))  # exactly one result per row
    internal = [r["row_no"] for r in results if r["error_kind"] == "internal"]
    poisoned = [*range(201, 301), *range(601, 701)]
    assert internal == poisoned  # the hook fires before any row of the chunk is fetched
    assert all(r["status"] == 200 for r in results if r["row_no"] not in poisoned)
    assert [(q.chunk_no, q.deaths, q.given_up) for q in await quarantined_chunks(db, job.id)] == [
        (2, 3, 100),
        (6, 3, 100),
    ]

    monkeypatch.delenv("CRAWLER_TEST_EXIT_ON_ROW")
    shown = run_cli("status", "poisoned-chunk", "--dsn", session_dsn)
    assert shown.returncode == 0, shown.stderr.decode()
    assert "quarantined: chunk 2 (rows 201-300), workers died 3 times" in shown.stdout.decode()
    assert "quarantined: chunk 6 (rows 601-700), workers died 3 times" in shown.stdout.decode()
    as_json = json.loads(run_cli("status", "poisoned-chunk", "--dsn", session_dsn, "--json").stdout)
    assert as_json["quarantined"][0] == {"chunk_no": 2, "first_row": 201, "last_row": 300, "deaths": 3, "given_up": 100}
    assert as_json["errors"]["internal"]["count"] == 200
