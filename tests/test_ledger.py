"""The ledger against a real PostgreSQL: migrations, leases and fencing, idempotent results."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
from hypothesis import example, given
from hypothesis import strategies as st

from crawler.job.inputs import InvalidRow, RequestRow
from crawler.ledger.chunks import chunk_requests, lease_chunk, mark_ingested, release_chunk, renew_leases, store_chunk
from crawler.ledger.jobs import Job, create_job, job_phase, set_job_state
from crawler.ledger.migrate import apply_migrations, migration_files
from crawler.ledger.results import ResultRow, finish_job, prepare_writer, row_ranges, write_results
from crawler.states import JobState
from crawler.urls import fingerprint


async def test_migrations_apply_once_and_twice_is_a_no_op(fresh_dsn):
    conn = await asyncpg.connect(fresh_dsn)
    try:
        first = await apply_migrations(conn)
        second = await apply_migrations(conn)
        assert first == [v for v, _ in migration_files()] and first
        assert second == []
        tables = {
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"jobs", "chunks", "requests", "results", "invalid_rows", "fingerprints", "schema_migrations"} <= tables
    finally:
        await conn.close()


async def test_concurrent_migrators_do_not_collide(fresh_dsn):
    conns = [await asyncpg.connect(fresh_dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(len(a) for a in applied) == [0, 0, len(migration_files())]
    finally:
        for c in conns:
            await c.close()


def rows(start: int, urls: list[str]) -> list[RequestRow]:
    return [RequestRow(start + i, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)]


async def new_job(db, name: str) -> Job:
    return await create_job(db, name=name, input="test", settings={})


async def test_duplicates_point_at_the_first_row_across_chunks(db):
    job = await new_job(db, "dups")
    first = await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/", "http://a/"]))
    second = await store_chunk(db, job.id, 1, rows(4, ["http://b/", "http://c/"]) + [InvalidRow(6, "x", "bad")])
    assert (first, second) == (2, 1)
    dup = dict(await db.fetch("SELECT row_no, dup_of FROM requests WHERE job_id = $1", job.id))
    assert dup == {1: None, 2: None, 3: 1, 4: 2, 5: None}
    assert await db.fetchval("SELECT rows_read FROM jobs WHERE id = $1", job.id) == 6


async def test_a_chunk_that_repeats_only_an_earlier_chunk_points_at_its_rows(db):
    """No repeat within the chunk, one of an earlier chunk at its very end: the chunk's new
    fingerprints are stored once, and the repeat points at the earlier row."""
    job = await new_job(db, "late-dup")
    assert await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/"])) == 2
    assert await store_chunk(db, job.id, 1, rows(3, ["http://c/", "http://d/", "http://b/"])) == 2
    dup = dict(await db.fetch("SELECT row_no, dup_of FROM requests WHERE job_id = $1", job.id))
    assert dup == {1: None, 2: None, 3: None, 4: None, 5: 2}
    stored = dict(await db.fetch("SELECT row_no, fingerprint FROM fingerprints WHERE job_id = $1", job.id))
    assert sorted(stored) == [1, 2, 3, 4]


def result(job_id: int, row_no: int, status: int = 200) -> ResultRow:
    return ResultRow(job_id, row_no, status, "http://a/", None, None, 1, False, 1.0, 2, b"\x00" * 32, None)


async def test_a_jobs_phase_is_its_state_and_whether_ingest_is_over(db):
    job = await new_job(db, "phase")
    assert await job_phase(db, job.id) == (JobState.INGESTING, False)
    await mark_ingested(db, job.id)
    assert await job_phase(db, job.id) == (JobState.RUNNING, True)
    await set_job_state(db, job.id, JobState.INTERRUPTED)
    assert await job_phase(db, job.id) == (JobState.INTERRUPTED, True)


async def test_a_stale_lease_cannot_commit_over_the_new_holder(db):
    job = await new_job(db, "fencing")
    await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/"]))
    await mark_ingested(db, job.id)
    old = (await lease_chunk(db, job.id, "old-worker", lease_seconds=60)).lease
    # The old holder went silent past its lease: its expiry moved into the past, not waited for.
    await db.execute("UPDATE chunks SET lease_expires = now() - interval '1 second' WHERE job_id = $1", job.id)
    new = (await lease_chunk(db, job.id, "new-worker", lease_seconds=60)).lease
    assert new is not None and new.chunk_no == old.chunk_no and new.fence > old.fence
    await prepare_writer(db)
    refused = await write_results(db, job.id, {old: [result(job.id, 1, 500)]}, {old}, 60)
    assert refused == {old}
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job.id) == 0
    refused = await write_results(db, job.id, {new: [result(job.id, 1), result(job.id, 2)]}, {new}, 60)
    assert refused == set()
    assert await db.fetchval("SELECT state FROM chunks WHERE job_id = $1", job.id) == "done"
    assert await finish_job(db, job.id)


async def test_results_are_idempotent_and_a_released_chunk_resumes_where_it_stopped(db):
    job = await new_job(db, "idempotent")
    await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/", "http://c/"]))
    await mark_ingested(db, job.id)
    await prepare_writer(db)
    lease = (await lease_chunk(db, job.id, "w1", 60)).lease
    await write_results(db, job.id, {lease: [result(job.id, 1)]}, set(), 60)
    # A replay (our COMMIT went through but its answer was lost) that also carries a new row:
    # what is stored stays, the new row lands, and the chunk counts each row once.
    await write_results(db, job.id, {lease: [result(job.id, 1, 500), result(job.id, 2)]}, set(), 60)
    stored = dict(await db.fetch("SELECT row_no, status FROM results WHERE job_id = $1", job.id))
    assert stored == {1: 200, 2: 200}
    assert await db.fetchval("SELECT done_rows FROM chunks WHERE job_id = $1", job.id) == 2
    await release_chunk(db, job.id, lease)
    again = await lease_chunk(db, job.id, "w2", 60)
    assert again.lease.fence == 2
    left = [r["row_no"] for r in await chunk_requests(db, job.id, again)]
    assert left == [3]
    assert not await finish_job(db, job.id)


async def finish_every_chunk(db, job_id: int) -> None:
    """Lease every chunk and write a 200 for each row to fetch, as a worker would."""
    await prepare_writer(db)
    while (chunk := await lease_chunk(db, job_id, "w1", 60)) is not None:
        todo = [r["row_no"] for r in await chunk_requests(db, job_id, chunk)]
        await write_results(db, job_id, {chunk.lease: [result(job_id, n) for n in todo]}, {chunk.lease}, 60)


async def test_the_end_of_a_job_gives_its_duplicates_the_outcome_of_their_first_row(db):
    """With duplicates, as counted by new chunks or not counted by chunks stored before the
    counts existed, each gets its first row's outcome; without, the job ends with one result
    per row all the same."""
    for name, uncounted in (("dups-counted", False), ("dups-uncounted", True)):
        job = await new_job(db, name)
        await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/"]))
        await store_chunk(db, job.id, 1, rows(3, ["http://c/", "http://a/"]))
        await mark_ingested(db, job.id)
        if uncounted:
            await db.execute("UPDATE chunks SET input_rows = 0, invalid_rows = 0 WHERE job_id = $1", job.id)
        await finish_every_chunk(db, job.id)
        assert await finish_job(db, job.id)
        stored = {
            r["row_no"]: (r["from_cache"], r["cache_kind"])
            for r in await db.fetch("SELECT row_no, from_cache, cache_kind FROM results WHERE job_id = $1", job.id)
        }
        assert stored == {1: (False, None), 2: (False, None), 3: (False, None), 4: (True, "duplicate")}, name
    job = await new_job(db, "no-dups")
    await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://b/"]) + [InvalidRow(3, "x", "bad")])
    await mark_ingested(db, job.id)
    await finish_every_chunk(db, job.id)
    assert await finish_job(db, job.id)
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", job.id) == "done"
    assert await db.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job.id) == 2


async def test_lease_skips_chunks_locked_by_another_transaction(session_dsn, db):
    job = await new_job(db, "skip-locked")
    await store_chunk(db, job.id, 0, rows(1, ["http://a/"]))
    await store_chunk(db, job.id, 1, rows(2, ["http://b/"]))
    other = await asyncpg.connect(session_dsn)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM chunks WHERE job_id = $1 AND chunk_no = 0 FOR UPDATE", job.id)
            chunk = await lease_chunk(db, job.id, "w", 60)
            assert chunk.lease.chunk_no == 1
    finally:
        await other.close()


async def test_concurrent_leases_each_take_exactly_one_chunk(session_dsn, db):
    """Under contention (other workers leasing, completing and renewing at the same time) every
    lease call takes one chunk: none is leased without its worker knowing."""
    job = await new_job(db, "one-lease-one-chunk")
    for n in range(300):
        await store_chunk(db, job.id, n, rows(n * 2 + 1, [f"http://h/{n}/a", f"http://h/{n}/b"]))
    await mark_ingested(db, job.id)
    await db.execute("ANALYZE chunks")
    conns = [await asyncpg.connect(session_dsn) for _ in range(4)]
    taken: list = []

    async def worker(conn, name):
        for _ in range(60):
            chunk = await lease_chunk(conn, job.id, name, 60)
            if chunk is None:
                return
            taken.append(chunk.lease)
            await renew_leases(conn, job.id, [chunk.lease], 60)
            if chunk.lease.chunk_no % 2:  # complete half of them, as a writer would
                await conn.execute(
                    "UPDATE chunks SET state = 'done' WHERE job_id = $1 AND chunk_no = $2", job.id, chunk.lease.chunk_no
                )

    try:
        await asyncio.gather(*(worker(c, f"w{i}") for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    assert len({lease.chunk_no for lease in taken}) == len(taken)
    touched = await db.fetchval("SELECT count(*) FROM chunks WHERE job_id = $1 AND fence > 0", job.id)
    assert touched == len(taken)


async def test_a_chunk_stores_every_request_column_and_a_retried_chunk_is_stored_once(db):
    job = await new_job(db, "columns")
    first = [
        RequestRow(1, "POST", "http://a/", fingerprint("POST", "http://a/", b"x"), '{"X-A":"1"}', b"x"),
        InvalidRow(2, "nope", "bad URL"),
        *rows(3, ["http://a/", "http://a/"]),
    ]
    assert await store_chunk(db, job.id, 0, first) == 2
    assert await store_chunk(db, job.id, 0, first) == 2  # the acknowledgement was lost: a no-op
    stored = await db.fetch(
        "SELECT row_no, chunk_no, method, url, headers->>'X-A' AS x_a, body, dup_of FROM requests"
        " WHERE job_id = $1 ORDER BY row_no",
        job.id,
    )
    assert [tuple(r) for r in stored] == [
        (1, 0, "POST", "http://a/", "1", b"x", None),
        (3, 0, "GET", "http://a/", None, None, None),
        (4, 0, "GET", "http://a/", None, None, 3),
    ]
    assert await db.fetchval("SELECT reason FROM invalid_rows WHERE job_id = $1", job.id) == "bad URL"


async def test_without_dedup_every_row_is_fetched(db):
    job = await new_job(db, "no-dedup")
    assert await store_chunk(db, job.id, 0, rows(1, ["http://a/", "http://a/"]), dedup=False) == 2
    assert await store_chunk(db, job.id, 1, rows(3, ["http://a/"]), dedup=False) == 1
    assert await db.fetchval("SELECT count(*) FROM requests WHERE job_id = $1 AND dup_of IS NULL", job.id) == 3
    assert await db.fetchval("SELECT count(*) FROM fingerprints WHERE job_id = $1", job.id) == 0


async def test_duplicates_of_a_big_job_point_at_their_first_row(db):
    """Many chunks, repeats from far back and within a chunk: each row's dup_of is its first row."""
    job = await new_job(db, "many-chunks")
    urls = [f"http://h/{(i * 7) % 1300}" for i in range(3000)]
    for chunk_no in range(30):
        first = chunk_no * 100
        await store_chunk(db, job.id, chunk_no, rows(first + 1, urls[first : first + 100]))
    first_row: dict[str, int] = {}
    expected = {}
    for row_no, url in enumerate(urls, start=1):
        expected[row_no] = first_row.get(url)
        first_row.setdefault(url, row_no)
    assert dict(await db.fetch("SELECT row_no, dup_of FROM requests WHERE job_id = $1", job.id)) == expected
    assert await db.fetchval("SELECT sum(fetch_rows) FROM chunks WHERE job_id = $1", job.id) == 1300


@given(st.lists(st.integers(1, 3000), max_size=40), st.integers(1, 5000))
@example([3, 3], 5)  # two spans of exactly one row too many together
def test_row_ranges_cover_every_span_once_in_order_within_the_size(lengths, rows):
    spans, first = [], 1
    for length in lengths:  # consecutive chunks, some rows apart
        spans.append((first, first + length - 1))
        first += length + length % 3
    ranges = row_ranges(spans, rows)
    assert all(a <= b < c for (a, b), (c, _) in itertools.pairwise(ranges))
    for first, last in spans:  # each span inside exactly one range
        assert sum(1 for a, b in ranges if a <= first and last <= b) == 1
    # A range is one span, or spans that together stay within `rows` rows.
    assert all(last - first < rows or (first, last) in spans for first, last in ranges)
    # and a range starts only where its first span would not fit in the one before.
    span_end = dict(spans)
    assert all(span_end[c] - a >= rows for (a, _), (c, _) in itertools.pairwise(ranges))
