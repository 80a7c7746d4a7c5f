"""A value the database refuses costs its own row, never the batch or the worker: the writer
isolates the refused rows, stores each as `internal` with the database's message, and commits the
rest fenced and exactly once."""

from __future__ import annotations

import asyncio
import zlib

from crawler.fetch.storable import storable
from crawler.fetch.worker_ledger import LedgerAccess
from crawler.fetch.writer import ResultWriter
from crawler.job.inputs import RequestRow
from crawler.ledger.chunks import Lease, lease_chunk, mark_ingested, release_chunk, store_chunk
from crawler.ledger.database import LedgerConnection
from crawler.ledger.jobs import create_job
from crawler.ledger.results import ResultRow, prepare_writer, write_results
from crawler.urls import fingerprint

ROWS = 1000


async def job_with_chunk(db, name: str, count: int = ROWS) -> tuple[int, Lease]:
    job = await create_job(db, name=name, input="test", settings={})
    urls = [f"http://a.test/{i}" for i in range(count)]
    await store_chunk(db, job.id, 0, [RequestRow(i + 1, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)])
    await mark_ingested(db, job.id)
    chunk = await lease_chunk(db, job.id, "w1", 60)
    return job.id, chunk.lease


def writer_on(dsn: str, job_id: int, batch_size: int) -> tuple[LedgerConnection, ResultWriter]:
    """A ResultWriter on a connection of its own, set up as a worker's writer's is."""
    conn = LedgerConnection(dsn, outage_limit=300.0, setup=prepare_writer, job=job_id)
    return conn, ResultWriter(LedgerAccess(conn, job_id), batch_size=batch_size, interval=60, lease_seconds=60)


def ok(job_id: int, row_no: int, **changes) -> ResultRow:
    values = dict(status=200, final_url=f"http://a.test/{row_no - 1}", error_kind=None, error=None)
    values.update(changes)
    return ResultRow(
        job_id,
        row_no,
        values["status"],
        values["final_url"],
        values["error_kind"],
        values["error"],
        1,
        False,
        1.0,
        2,
        b"\x01" * 32,
        None,
    )


async def outcomes(db, job_id: int) -> dict[int, tuple]:
    return {
        r["row_no"]: (r["status"], r["error_kind"], r["error"])
        for r in await db.fetch("SELECT row_no, status, error_kind, error FROM results WHERE job_id = $1", job_id)
    }


async def chunk_counts(db, job_id: int) -> tuple:
    row = await db.fetchrow("SELECT state, done_rows, ok_rows, failed_rows FROM chunks WHERE job_id = $1", job_id)
    return tuple(row)


async def test_one_refused_row_of_a_thousand_is_stored_as_internal_and_the_rest_as_sent(session_dsn, db):
    job_id, lease = await job_with_chunk(db, "poison-nul")
    conn, writer = writer_on(session_dsn, job_id, ROWS)
    try:
        for row in range(1, ROWS + 1):
            # What an unprotected fetcher would hand over: a reason phrase with a NUL.
            record = (
                ok(job_id, row, status=500, error_kind="http_status", error="HTTP 500 Bad\x00Thing")
                if row == 500
                else ok(job_id, row)
            )
            writer.add(lease, record)
        writer.complete(lease)
        await writer.flush()
    finally:
        await conn.close()
    stored = await outcomes(db, job_id)
    assert len(stored) == ROWS
    assert sum(1 for status, kind, _ in stored.values() if status == 200 and kind is None) == ROWS - 1
    status, kind, error = stored[500]
    assert (status, kind) == (None, "internal")
    assert error.startswith("the result could not be stored: CharacterNotInRepertoireError")
    assert "0x00" in error and storable(error, 10_000) == (error, False)
    assert await chunk_counts(db, job_id) == ("done", ROWS, ROWS - 1, 1)
    assert not writer.lost


async def test_refused_text_bodies_and_cache_entries_are_isolated_too(session_dsn, db):
    """A lone surrogate (what aiohttp makes of bytes that are not UTF-8) fails on the client, in
    asyncpg's encoder; a NUL in a content type fails in the server, for the bodies table."""
    job_id, lease = await job_with_chunk(db, "poison-mixed", 200)
    conn, writer = writer_on(session_dsn, job_id, 1000)
    fps = [bytes([i]) * 32 for i in range(3)]
    try:
        for row in range(1, 201):
            record = ok(job_id, row, final_url="http://a.test/caf\udce9") if row == 7 else ok(job_id, row)
            body = ("text/html\x00", b"<p>") if row == 9 else ("text/html", b"<p>") if row < 20 else None
            remember = None
            if row <= 3:  # three cache entries, the second refused
                etag = '"a\udcff"' if row == 2 else '"ok"'
                remember = (fps[row - 1], 200, None, 2, b"\x01" * 32, etag, None, job_id)
            writer.add(lease, record, body, remember)
        writer.complete(lease)
        await writer.flush()
    finally:
        await conn.close()
    stored = await outcomes(db, job_id)
    assert len(stored) == 200
    assert stored[7][1] == "internal" and "UnicodeEncodeError" in stored[7][2]
    assert stored[9][1] == "internal" and stored[9][2].startswith("its body could not be stored:")
    assert all(kind is None for row, (_, kind, _) in stored.items() if row not in (7, 9))
    bodies = {
        r["row_no"]: r
        for r in await db.fetch("SELECT row_no, content_type, body FROM bodies WHERE job_id = $1", job_id)
    }
    assert sorted(bodies) == [r for r in range(1, 20) if r != 9]
    assert zlib.decompress(bodies[1]["body"]) == b"<p>"
    cached = {
        r["fingerprint"] for r in await db.fetch("SELECT fingerprint FROM response_cache WHERE job_id = $1", job_id)
    }
    assert cached == {fps[0], fps[2]}
    assert await chunk_counts(db, job_id) == ("done", 200, 198, 2)


async def test_a_stale_lease_with_a_refused_row_is_still_refused_whole(db):
    """Two chunks in one batch, both with a refused row: the one whose lease was taken over is
    refused whole, also while the batch is written again to isolate the other's refused row."""
    job = await create_job(db, name="poison-fenced", input="test", settings={})
    for chunk_no in (0, 1):
        urls = [f"http://a.test/{chunk_no}/{i}" for i in range(10)]
        await store_chunk(
            db,
            job.id,
            chunk_no,
            [RequestRow(10 * chunk_no + i + 1, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)],
        )
    await mark_ingested(db, job.id)
    stale = (await lease_chunk(db, job.id, "w1", 60)).lease
    held = (await lease_chunk(db, job.id, "w1", 60)).lease
    await release_chunk(db, job.id, stale)
    taken = (await lease_chunk(db, job.id, "w2", 60)).lease
    assert (stale.chunk_no, held.chunk_no, taken) == (0, 1, Lease(0, stale.fence + 1))
    await prepare_writer(db)

    def batch(first: int, poisoned: int) -> list[tuple]:
        return [ok(job.id, r, error="x\x00") if r == poisoned else ok(job.id, r) for r in range(first, first + 10)]

    refused = await write_results(db, job.id, {stale: batch(1, 3), held: batch(11, 15)}, {stale, held}, 60)
    assert refused == {stale}
    stored = await outcomes(db, job.id)
    assert sorted(stored) == list(range(11, 21)) and stored[15][1] == "internal"
    counts = {
        r["chunk_no"]: tuple(r)[1:]
        for r in await db.fetch(
            "SELECT chunk_no, state, done_rows, ok_rows, failed_rows FROM chunks WHERE job_id = $1", job.id
        )
    }
    assert counts == {0: ("leased", 0, 0, 0), 1: ("done", 10, 9, 1)}
    # the new holder's batch, with the same refused row: isolated, and its chunk completes
    assert await write_results(db, job.id, {taken: batch(1, 3)}, {taken}, 60) == set()
    stored = await outcomes(db, job.id)
    assert len(stored) == 20 and stored[3][1] == "internal"
    assert await db.fetchval("SELECT sum(ok_rows) FROM chunks WHERE job_id = $1 AND state = 'done'", job.id) == 18


async def test_a_replayed_batch_with_a_refused_row_counts_each_row_once(db):
    """The replay path (a commit whose answer was lost) meets the refused row too."""
    job_id, lease = await job_with_chunk(db, "poison-replay", 10)
    await prepare_writer(db)
    await write_results(db, job_id, {lease: [ok(job_id, r) for r in range(1, 5)]}, set(), 60)
    batch = [ok(job_id, r, error="\x00") if r == 6 else ok(job_id, r) for r in range(1, 11)]
    assert await write_results(db, job_id, {lease: batch}, {lease}, 60) == set()
    stored = await outcomes(db, job_id)
    assert len(stored) == 10 and stored[6][1] == "internal"
    assert await chunk_counts(db, job_id) == ("done", 10, 9, 1)


async def test_every_row_refused_still_completes_the_chunk(db):
    job_id, lease = await job_with_chunk(db, "poison-all", 64)
    await prepare_writer(db)
    batch = [ok(job_id, r, error=f"{r}\x00") for r in range(1, 65)]
    assert await asyncio.wait_for(write_results(db, job_id, {lease: batch}, {lease}, 60), 60) == set()
    stored = await outcomes(db, job_id)
    assert len(stored) == 64 and {kind for _, kind, _ in stored.values()} == {"internal"}
    assert await chunk_counts(db, job_id) == ("done", 64, 0, 64)
