"""The PostgreSQL ledger: jobs, chunks, requests, results — and nothing of HTTP.

Chunks are leased with FOR UPDATE SKIP LOCKED and carry a fencing number; a result write locks
its chunk's row and checks the fence, so a worker that lost its lease cannot commit over the new
holder. Results are keyed by (job, row): every write is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import asyncpg

from crawler import cache
from crawler.errors import CrawlerError, JobNotFound
from crawler.inputs import InvalidRow, RequestRow
from crawler.kinds import ErrorKind
from crawler.states import ChunkState, JobState
from crawler.storable import ERROR_CAP, storable

log = logging.getLogger(__name__)

class ResultRow(NamedTuple):
    """One request's outcome as a worker writes it, its fields in the results table's COPY order:
    named everywhere, made a plain tuple for asyncpg's copy_records_to_table (_copyable)."""

    job_id: int
    row_no: int
    status: int | None
    final_url: str | None
    error_kind: str | None  # None: the request succeeded (crawler.kinds.ErrorKind otherwise)
    error: str | None
    attempts: int
    from_cache: bool
    elapsed_ms: float
    body_bytes: int | None
    body_sha256: bytes | None
    cache_kind: str | None  # duplicate, fresh or revalidated when from_cache


class BodyRow(NamedTuple):
    """A response body kept with --store-bodies, compressed, as the bodies table holds it."""

    job_id: int
    row_no: int
    content_type: str | None
    body: bytes


RESULT_COLUMNS = ResultRow._fields


class JobExists(CrawlerError):
    """A job of that name exists; the user is told how to resume it."""


@dataclass(slots=True, frozen=True)
class Job:
    id: int
    name: str | None
    input: str
    state: JobState
    settings: dict
    rows_read: int
    ingest_done: bool


class Lease(NamedTuple):
    """A chunk as leased: its number and the fence that lease got. Looked up and compared a few
    times per request (a tuple's hash and equality run in C; a dataclass's in Python)."""

    chunk_no: int
    fence: int


@dataclass(slots=True)
class JobCounts:
    """A job's live counts (job_counts), polled for progress, `crawler status` and the metrics;
    the supervisor adds what only it knows: whether ingest is over and how far into the input."""

    rows_read: int
    state: str
    to_fetch: int  # rows to fetch, duplicates and invalid rows left out
    fetched: int
    ok: int
    failed: int
    invalid: int
    duplicates: int
    pending: int  # chunks by state
    leased: int
    done: int
    ingest_done: bool = True
    bytes_read: int = 0  # of the input file, compressed
    bytes_total: int | None = None  # None: its size is unknown (stdin)

    def chunks(self) -> dict[str, int]:
        """The job's chunks by state, keyed by the state's name."""
        return {state.value: getattr(self, state.value) for state in ChunkState}


@dataclass(slots=True, frozen=True)
class LeasedChunk:
    lease: Lease
    first_row: int
    last_row: int


# --- jobs ---------------------------------------------------------------------------------------

async def create_job(conn: asyncpg.Connection, *, name: str | None, input: str, settings: dict) -> Job:
    import orjson

    try:
        row = await conn.fetchrow(
            "INSERT INTO jobs (name, input, settings) VALUES ($1, $2, $3::jsonb) RETURNING *",
            name, input, orjson.dumps(settings).decode(),
        )
    except asyncpg.UniqueViolationError:
        raise JobExists(
            f"a job named '{name}' already exists; run `crawler resume {name}` to finish it,"
            f" or choose another --job-name."
        ) from None
    return _job(row)


def _job(row: asyncpg.Record) -> Job:
    import orjson

    settings = row["settings"]
    if isinstance(settings, str):
        settings = orjson.loads(settings)
    return Job(row["id"], row["name"], row["input"], JobState(row["state"]), settings, row["rows_read"],
               row["ingest_done"])


async def fetch_timing(conn: asyncpg.Connection, job_id: int) -> tuple[asyncpg.Record, asyncpg.Record]:
    """A finished job's timing, for `crawler bench`: from its creation to the first fetch and
    from there to its end (the job's row); results, fetches, the window in which they were made
    and the fetches' latency percentiles (its results)."""
    job = await conn.fetchrow(
        "SELECT extract(epoch FROM first_fetch_at - created_at) AS to_first,"
        " extract(epoch FROM finished_at - first_fetch_at) AS fetch_to_finish"
        " FROM jobs WHERE id = $1",
        job_id,
    )
    results = await conn.fetchrow(
        "SELECT count(*) AS rows, count(*) FILTER (WHERE NOT from_cache) AS fetched,"
        " extract(epoch FROM max(fetched_at) FILTER (WHERE NOT from_cache)"
        "   - (SELECT first_fetch_at FROM jobs WHERE id = $1)) AS fetch_window,"
        " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY elapsed_ms)"
        "   FILTER (WHERE NOT from_cache) AS latency"
        " FROM results WHERE job_id = $1",
        job_id,
    )
    return job, results


async def latest_job_id(conn: asyncpg.Connection) -> int | None:
    """The newest job's id (what `crawler status` shows when no job is named); None if none."""
    return await conn.fetchval("SELECT max(id) FROM jobs")


async def job_list(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every job, oldest first, with its results so far (`crawler jobs`)."""
    return await conn.fetch(
        "SELECT j.id, j.name, j.state, j.rows_read, j.created_at,"
        " (SELECT count(*) FROM results r WHERE r.job_id = j.id) AS results"
        " FROM jobs j ORDER BY j.id"
    )


async def find_job(conn: asyncpg.Connection, ref: str | int) -> Job:
    """A job by its id or its name."""
    ref = str(ref)
    row = await conn.fetchrow("SELECT * FROM jobs WHERE name = $1", ref)
    if row is None and ref.isdigit():
        row = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", int(ref))
    if row is None:
        raise JobNotFound(f"no job with id or name '{ref}'; `crawler jobs` lists them.")
    return _job(row)


async def unfinished_job(conn: asyncpg.Connection, *, name: str | None, input: str) -> Job | None:
    """The latest job of that name (or, without a name, of that input) that is not done."""
    if name is not None:
        row = await conn.fetchrow("SELECT * FROM jobs WHERE name = $1 AND state <> 'done'", name)
    else:
        row = await conn.fetchrow(
            "SELECT * FROM jobs WHERE input = $1 AND state <> 'done' ORDER BY id DESC LIMIT 1", input
        )
    return _job(row) if row else None


async def job_phase(conn: asyncpg.Connection, job_id: int) -> tuple[str, bool]:
    """The job's state and whether its ingest is over: what a worker polls to know it may stop."""
    row = await conn.fetchrow("SELECT state, ingest_done FROM jobs WHERE id = $1", job_id)
    return row["state"], row["ingest_done"]


async def set_job_state(conn: asyncpg.Connection, job_id: int, state: JobState) -> None:
    await conn.execute(
        "UPDATE jobs SET state = $2, finished_at = CASE WHEN $2 = 'done' THEN now() END WHERE id = $1",
        job_id, state,
    )


# --- ingest -------------------------------------------------------------------------------------

class _SeenBefore(Exception):
    """A chunk stored as if all its fingerprints were new met one the job already has."""


# Stores the chunk's new fingerprints (each with its first row in the chunk) and returns, for those
# an earlier chunk stored, that chunk's first row. It never joins the job's fingerprints: a join's
# plan depends on statistics that lag a growing job (a hash of all the job's fingerprints, once per
# chunk, until autoanalyze: ingest quadratic in the job's size); the subquery is one primary-key
# probe per fingerprint seen before, none in the common case.
_STORE_FINGERPRINTS = (
    "WITH new AS ("
    " INSERT INTO fingerprints (job_id, fingerprint, row_no)"
    " SELECT $1, f, r FROM unnest($2::bytea[], $3::bigint[]) AS u(f, r)"
    " ON CONFLICT DO NOTHING RETURNING fingerprint)"
    " SELECT u.f, (SELECT row_no FROM fingerprints WHERE job_id = $1 AND fingerprint = u.f)"
    " FROM unnest($2::bytea[]) AS u(f) WHERE u.f NOT IN (SELECT fingerprint FROM new)"
)


async def store_chunk(
    conn: asyncpg.Connection, job_id: int, chunk_no: int, rows: Sequence[RequestRow | InvalidRow],
    *, dedup: bool = True,
) -> int:
    """Write one chunk of input rows; return how many of them need a fetch.

    A row whose fingerprint was seen earlier in the job is stored with dup_of pointing at the
    first row of that fingerprint; the database, not this process, remembers fingerprints.
    Without `dedup` (--no-cache) every row is fetched.
    """
    requests = [r for r in rows if isinstance(r, RequestRow)]
    first: dict[bytes, int] = {}  # fingerprint -> the chunk's first row of it
    if dedup:
        for r in requests:  # rows come in order: the first seen is the chunk's first
            first.setdefault(r.fingerprint, r.row)
    # The chunk is first stored as if none of its fingerprints were in the job, and again if one
    # was; an input that repeats itself within a chunk likely repeats earlier chunks too, and
    # takes the general way at once.
    if len(first) == len(requests):
        try:
            return await _store_chunk(conn, job_id, chunk_no, rows, requests, first, all_new=True)
        except _SeenBefore:
            pass
    return await _store_chunk(conn, job_id, chunk_no, rows, requests, first, all_new=False)


async def _store_chunk(
    conn: asyncpg.Connection, job_id: int, chunk_no: int, rows: Sequence[RequestRow | InvalidRow],
    requests: list[RequestRow], first: dict[bytes, int], *, all_new: bool,
) -> int:
    invalid = [(job_id, r.row, r.raw, r.reason) for r in rows if isinstance(r, InvalidRow)]
    async with conn.transaction():
        stored = await conn.fetchval(
            "SELECT fetch_rows FROM chunks WHERE job_id = $1 AND chunk_no = $2", job_id, chunk_no
        )
        if stored is not None:  # a retry after a commit whose acknowledgement was lost
            return stored
        if first and all_new:
            # A COPY: half the server's CPU of the statement above, and no array parameters
            # (asyncpg checks every element of an array against the abstract collection types).
            try:
                await conn.copy_records_to_table(
                    "fingerprints", records=[(job_id, f, r) for f, r in first.items()],
                    columns=("job_id", "fingerprint", "row_no"),
                )
            except asyncpg.UniqueViolationError:
                raise _SeenBefore from None  # leaving the block rolls the transaction back
        elif first:
            # fingerprint -> the job's first row of it
            first = first | dict(await conn.fetch(_STORE_FINGERPRINTS, job_id, list(first), list(first.values())))
        if invalid:
            await conn.copy_records_to_table(
                "invalid_rows", records=invalid, columns=("job_id", "row_no", "raw", "reason")
            )
        records = []
        for r in requests:
            dup_of = first.get(r.fingerprint)
            records.append((job_id, r.row, chunk_no, r.method, r.url, r.fingerprint, r.headers, r.body,
                            r.normalized, r.given, None if dup_of == r.row else dup_of))
        fetch_rows = sum(1 for record in records if record[-1] is None)
        if records:
            await conn.copy_records_to_table(
                "requests", records=records,
                columns=("job_id", "row_no", "chunk_no", "method", "url", "fingerprint", "headers", "body",
                         "normalized_url", "given_url", "dup_of"),
            )
        await conn.execute(
            "INSERT INTO chunks (job_id, chunk_no, first_row, last_row, fetch_rows, input_rows, invalid_rows, state)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $5 = 0 THEN 'done' ELSE 'pending' END)",
            job_id, chunk_no, rows[0].row, rows[-1].row, fetch_rows, len(rows), len(invalid),
        )
        await conn.execute("UPDATE jobs SET rows_read = $2 WHERE id = $1", job_id, rows[-1].row)
    return fetch_rows


async def mark_first_fetch(conn: asyncpg.Connection, job_id: int) -> None:
    await conn.execute("UPDATE jobs SET first_fetch_at = coalesce(first_fetch_at, now()) WHERE id = $1", job_id)


async def mark_ingested(conn: asyncpg.Connection, job_id: int) -> None:
    await conn.execute("UPDATE jobs SET ingest_done = true, state = 'running' WHERE id = $1", job_id)


async def analyze_chunks(conn: asyncpg.Connection) -> None:
    """Fresh planner statistics for the chunks table (a sample: ~0.1 s whatever its size)."""
    await conn.execute("ANALYZE chunks")


async def ingest_position(conn: asyncpg.Connection, job_id: int) -> tuple[int, int]:
    """(next chunk number, last row stored) — where an interrupted ingest continues."""
    row = await conn.fetchrow(
        "SELECT coalesce(max(chunk_no) + 1, 0) AS next_chunk, coalesce(max(last_row), 0) AS last_row"
        " FROM chunks WHERE job_id = $1",
        job_id,
    )
    return row["next_chunk"], row["last_row"]


# --- leases -------------------------------------------------------------------------------------

async def lease_chunk(conn: asyncpg.Connection, job_id: int, owner: str, lease_seconds: float) -> LeasedChunk | None:
    row = await conn.fetchrow(
        # A scalar subquery runs once (an InitPlan); joined as a FROM item it may be rescanned and
        # lease several chunks in one statement, all but one of them silently.
        "UPDATE chunks c SET state = 'leased', lease_owner = $2, fence = c.fence + 1,"
        "   lease_expires = now() + make_interval(secs => $3)"
        " WHERE c.job_id = $1 AND c.chunk_no = (SELECT chunk_no FROM chunks WHERE job_id = $1"
        "       AND (state = 'pending' OR (state = 'leased' AND lease_expires < now()))"
        # A chunk whose holders died (quarantine below) goes to a worker holding nothing, and
        # its holder leases nothing more: a next death then names that one chunk alone.
        "       AND (deaths = 0 OR NOT EXISTS (SELECT 1 FROM chunks h WHERE h.job_id = $1"
        "            AND h.state = 'leased' AND h.lease_owner = $2))"
        "       ORDER BY chunk_no LIMIT 1 FOR UPDATE SKIP LOCKED)"
        "   AND NOT EXISTS (SELECT 1 FROM chunks s WHERE s.job_id = $1 AND s.state = 'leased'"
        "       AND s.lease_owner = $2 AND s.deaths > 0)"
        " RETURNING c.chunk_no, c.fence, c.first_row, c.last_row",
        job_id, owner, lease_seconds,
    )
    return LeasedChunk(Lease(row["chunk_no"], row["fence"]), row["first_row"], row["last_row"]) if row else None


async def renew_leases(conn: asyncpg.Connection, job_id: int, leases: Iterable[Lease],
                       lease_seconds: float) -> set[int]:
    """Extend the given leases; return the chunk numbers whose lease is still ours."""
    leases = list(leases)
    if not leases:
        return set()
    rows = await conn.fetch(
        "UPDATE chunks c SET lease_expires = now() + make_interval(secs => $4)"
        " FROM unnest($2::int[], $3::bigint[]) AS held(chunk_no, fence)"
        # The ANY() is for the planner: without it, a job newer than the statistics gets a scan
        # of all its chunks per renewal.
        " WHERE c.job_id = $1 AND c.chunk_no = ANY($2::int[]) AND c.chunk_no = held.chunk_no"
        "   AND c.fence = held.fence AND c.state = 'leased'"
        " RETURNING c.chunk_no",
        job_id, [lease.chunk_no for lease in leases], [lease.fence for lease in leases], lease_seconds,
    )
    return {r["chunk_no"] for r in rows}


async def release_chunk(conn: asyncpg.Connection, job_id: int, lease: Lease) -> None:
    """Give a chunk back unfinished, so another worker (or a resume) takes it at once."""
    await conn.execute(
        "UPDATE chunks SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
        " WHERE job_id = $1 AND chunk_no = $2 AND fence = $3 AND state = 'leased'",
        job_id, lease.chunk_no, lease.fence,
    )


async def release_leases_of(conn: asyncpg.Connection, job_id: int, owners: Sequence[str]) -> int:
    """Give back every chunk leased by these owners, known to be dead, so that the work is
    redone now rather than when the leases expire."""
    result = await conn.execute(
        "UPDATE chunks SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
        " WHERE job_id = $1 AND state = 'leased' AND lease_owner = ANY($2::text[])",
        job_id, list(owners),
    )
    return int(result.split()[-1])


async def lease_owners(conn: asyncpg.Connection, job_id: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT lease_owner FROM chunks WHERE job_id = $1 AND state = 'leased' AND lease_owner IS NOT NULL",
        job_id,
    )
    return [r["lease_owner"] for r in rows]


async def chunk_requests(conn: asyncpg.Connection, job_id: int, chunk: LeasedChunk) -> list[asyncpg.Record]:
    """The requests of a chunk that still need a fetch: not duplicates, no result yet.

    Two primary-key range scans rather than one anti-join: their plan cannot go wrong while the
    tables grow faster than their statistics, nor change with the PostgreSQL version (an anti-join
    of a job newer than the statistics may nest loops over the whole job). A first lease has no
    results to look for.
    """
    rows = await conn.fetch(
        "SELECT row_no, method, url, fingerprint, headers::text AS headers, body FROM requests"
        " WHERE job_id = $1 AND row_no BETWEEN $2 AND $3"
        " AND dup_of IS NULL ORDER BY row_no",
        job_id, chunk.first_row, chunk.last_row,
    )
    if chunk.lease.fence == 1:
        return rows
    done = {r["row_no"] for r in await conn.fetch(
        "SELECT row_no FROM results WHERE job_id = $1 AND row_no BETWEEN $2 AND $3",
        job_id, chunk.first_row, chunk.last_row,
    )}
    return [r for r in rows if r["row_no"] not in done]


async def open_chunks(conn: asyncpg.Connection, job_id: int) -> int:
    return await conn.fetchval("SELECT count(*) FROM chunks WHERE job_id = $1 AND state <> 'done'", job_id)


# --- results ------------------------------------------------------------------------------------

async def prepare_writer(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS result_stage (LIKE results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


async def write_results(
    conn: asyncpg.Connection,
    job_id: int,
    batches: dict[Lease, list[ResultRow]],
    completed: set[Lease],
    lease_seconds: float,
    bodies: dict[Lease, list[BodyRow]] | None = None,
    cache_rows: list[tuple] | None = None,
    cache_touch: list[bytes] | None = None,
) -> set[Lease]:
    """Commit results for the given leases, and complete the `completed` ones, in one transaction.

    Returns the leases that were refused because their fence is no longer current; their
    results are dropped, since the chunk's new holder redoes them.

    Results are COPied straight into `results`. A batch can only meet rows already there when it
    is a replay, after a connection lost before we saw our COMMIT's answer; the COPY then fails
    on the primary key and the batch is written again through a staging table, keeping what is
    there and counting only the new rows.

    A batch the database refuses for one of its values (a NUL, bytes that are not UTF-8: see
    DATA_ERRORS) is written again with each part in a savepoint; a refused row is found by
    halving, and stored as an `internal` result that says why. A worker never dies of its data.
    """
    args = (conn, job_id, batches, completed, lease_seconds, bodies, cache_rows, cache_touch)
    replay = isolate = False
    while True:
        try:
            return await _write_results(*args, replay=replay, isolate=isolate)
        except asyncpg.UniqueViolationError:
            if replay:
                raise
            replay = True
        except DATA_ERRORS:
            # A value the database refuses is the value's fault, not the batch's: written again,
            # the refused rows are found and stored as `internal`, and the rest as usual.
            if isolate:
                raise
            isolate = True


# What a write can fail on because of a value rather than the database: PostgreSQL's data
# exceptions (class 22: a NUL, bytes that are not UTF-8, ...) and what asyncpg cannot encode
# client side (a lone surrogate). Neither leaves the connection unusable.
DATA_ERRORS = (asyncpg.DataError, UnicodeError)


async def _write_results(
    conn: asyncpg.Connection,
    job_id: int,
    batches: dict[Lease, list[ResultRow]],
    completed: set[Lease],
    lease_seconds: float,
    bodies: dict[Lease, list[BodyRow]] | None,
    cache_rows: list[tuple] | None,
    cache_touch: list[bytes] | None,
    *,
    replay: bool,
    isolate: bool,
) -> set[Lease]:
    leases = sorted(set(batches) | completed, key=lambda lease: lease.chunk_no)
    async with conn.transaction():
        current = await conn.fetch(
            "SELECT chunk_no, fence FROM chunks WHERE job_id = $1 AND chunk_no = ANY($2::int[])"
            " AND state = 'leased' ORDER BY chunk_no FOR UPDATE",
            job_id, [lease.chunk_no for lease in leases],
        )
        held = {Lease(r["chunk_no"], r["fence"]) for r in current}
        refused = {lease for lease in leases if lease not in held}
        records = [rec for lease, recs in batches.items() if lease in held for rec in recs]
        kept_bodies = [rec for lease, recs in (bodies or {}).items() if lease in held for rec in recs]
        table = "result_stage" if replay else "results"
        if isolate:
            replaced = await _store_isolating(conn, table, records, kept_bodies)
            if replaced:
                batches = {lease: [replaced.get(rec.row_no, rec) for rec in recs] for lease, recs in batches.items()}
                records = [replaced.get(rec.row_no, rec) for rec in records]
            kept_bodies = []  # stored above
        elif records:
            await conn.copy_records_to_table(table, records=_copyable(records), columns=RESULT_COLUMNS)
        if records and replay:
            new = {r["row_no"] for r in await conn.fetch(
                "INSERT INTO results SELECT * FROM result_stage ON CONFLICT DO NOTHING RETURNING row_no")}
            batches = {lease: [rec for rec in recs if rec.row_no in new] for lease, recs in batches.items()}
        # The cross-job cache learns from every write, fenced or not: an answer is an answer.
        if isolate:
            # An entry the database refuses is not remembered: the next job fetches that URL.
            for _row, message in await _refused_rows(conn, cache.store, cache_rows or []):
                log.warning("a response was not cached: %s", message)
        else:
            await cache.store(conn, cache_rows or [])
        await cache.touch(conn, cache_touch or [])
        await _store_bodies(conn, kept_bodies)
        kept = [lease for lease in leases if lease in held]
        if kept:
            ok = [sum(1 for rec in batches.get(lease, ()) if rec.error_kind is None) for lease in kept]
            await conn.execute(
                "UPDATE chunks c SET done_rows = CASE WHEN w.complete THEN c.fetch_rows ELSE c.done_rows + w.n END,"
                "   ok_rows = c.ok_rows + w.ok, failed_rows = c.failed_rows + w.n - w.ok,"
                "   state = CASE WHEN w.complete THEN 'done' ELSE c.state END,"
                "   lease_owner = CASE WHEN w.complete THEN NULL ELSE c.lease_owner END,"
                "   lease_expires = CASE WHEN w.complete THEN NULL ELSE now() + make_interval(secs => $5) END"
                " FROM unnest($2::int[], $3::int[], $4::bool[], $6::int[]) AS w(chunk_no, n, complete, ok)"
                " WHERE c.job_id = $1 AND c.chunk_no = ANY($2::int[]) AND c.chunk_no = w.chunk_no",
                job_id,
                [lease.chunk_no for lease in kept],
                [len(batches.get(lease, ())) for lease in kept],
                [lease in completed for lease in kept],
                lease_seconds,
                ok,
            )
    return refused


def _copyable(rows: list[ResultRow]) -> list[tuple]:
    """The rows as plain tuples: asyncpg's COPY reads an exact tuple's fields directly and any
    other sequence's through the generic protocol. Twelve columns, 200 000 rows, client CPU per
    row: 1.3-1.8 us as ResultRow, 0.4 us as tuples, 0.7 us converted here first."""
    return list(map(tuple, rows))


async def _store_bodies(conn: asyncpg.Connection, rows: list[BodyRow]) -> None:
    if rows:
        await conn.executemany(
            "INSERT INTO bodies (job_id, row_no, content_type, body) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING",
            rows,
        )


async def _store_isolating(
    conn: asyncpg.Connection, table: str, records: list[ResultRow], bodies: list[BodyRow],
) -> dict[int, ResultRow]:
    """Store the bodies and result records the database takes; return, by row, the `internal`
    record stored instead of each result it refused (or whose body it refused)."""
    why: dict[int, str] = {}  # row -> why its result is stored as internal
    for body, message in await _refused_rows(conn, _store_bodies, bodies):
        why[body.row_no] = f"its body could not be stored: {message}"

    async def copy(conn: asyncpg.Connection, rows: list[ResultRow]) -> None:
        await conn.copy_records_to_table(table, records=_copyable(rows), columns=RESULT_COLUMNS)

    for record, message in await _refused_rows(conn, copy, [rec for rec in records if rec.row_no not in why]):
        why[record.row_no] = f"the result could not be stored: {message}"
    if not why:
        return {}
    internal = {rec.row_no: _internal(rec, why[rec.row_no]) for rec in records if rec.row_no in why}
    await copy(conn, list(internal.values()))
    log.warning("%d results stored as internal, the database refused them (the first: %s)",
                len(internal), next(iter(internal.values())).error)
    return internal


def _internal(record: ResultRow, why: str) -> ResultRow:
    """The `internal` result that stands for a record the database refused: the row, its
    attempts and time, and why (made storable itself)."""
    return record._replace(status=None, final_url=None, error_kind=ErrorKind.INTERNAL,
                           error=storable(why, ERROR_CAP)[0], body_bytes=None, body_sha256=None)


Row = TypeVar("Row", bound=tuple)


async def _refused_rows(conn: asyncpg.Connection, store: Callable[[asyncpg.Connection, list[Row]], Awaitable[None]],
                        rows: list[Row]) -> list[tuple[Row, str]]:
    """Store `rows` by `store(conn, rows)`, each part in a savepoint; find the rows the database
    refuses for their data by halving the part that fails, and return each with the error."""
    if not rows:
        return []
    try:
        async with conn.transaction():  # a savepoint: a refused part leaves nothing behind
            await store(conn, rows)
        return []
    except DATA_ERRORS as exc:
        if len(rows) == 1:
            return [(rows[0], f"{type(exc).__name__}: {exc}")]
    half = len(rows) // 2
    return await _refused_rows(conn, store, rows[:half]) + await _refused_rows(conn, store, rows[half:])


# Duplicates get their first row's outcome range by range of the job's rows (the chunks with
# duplicates, about DUPLICATE_BATCH_ROWS rows at a time), each duplicate's first row looked up by
# the results' primary key. The plan is spelled out rather than left to the planner: a job newer
# than the table statistics looks like one row to it, and a join of requests and results then
# becomes, on PostgreSQL 15, a nested loop whose inner scan reads the whole job for every
# duplicate (quadratic), whatever the local planner settings; `row_no = ANY(...)` is likewise
# turned into a filter over the whole job. A LATERAL subquery with a LIMIT is never flattened into
# a join, so it runs once per duplicate, and its equalities on both key columns make it a
# primary-key probe on every version; the outer scan is a primary-key range.
DUPLICATE_BATCH_ROWS = 5000
_DUPLICATE_CHUNKS = (
    # Chunks count their duplicates (input - invalid - to fetch); chunks stored before the counts
    # existed have 0 input rows and are looked through.
    "SELECT first_row, last_row FROM chunks WHERE job_id = $1"
    " AND (input_rows = 0 OR input_rows - invalid_rows > fetch_rows) ORDER BY chunk_no"
)
_COPY_OUTCOMES = (
    "INSERT INTO results (job_id, row_no, status, final_url, error_kind, error, attempts,"
    "                     from_cache, elapsed_ms, body_bytes, body_sha256, cache_kind)"
    " SELECT $1, q.row_no, p.status, p.final_url, p.error_kind, p.error, 0,"
    "        true, 0, p.body_bytes, p.body_sha256, 'duplicate'"
    " FROM requests q CROSS JOIN LATERAL ("
    "     SELECT status, final_url, error_kind, error, body_bytes, body_sha256 FROM results"
    "     WHERE job_id = $1 AND row_no = q.dup_of LIMIT 1) AS p"
    " WHERE q.job_id = $1 AND q.row_no BETWEEN $2 AND $3 AND q.dup_of IS NOT NULL"
    " ON CONFLICT DO NOTHING"
)


def row_ranges(spans: Iterable[tuple[int, int]], rows: int) -> list[tuple[int, int]]:
    """Consecutive (first, last) row spans, in row order, joined into ranges of at most `rows`
    rows each (a single span longer than that is a range of its own)."""
    ranges: list[tuple[int, int]] = []
    for first, last in spans:
        if ranges and last - ranges[-1][0] < rows:
            ranges[-1] = (ranges[-1][0], last)
        else:
            ranges.append((first, last))
    return ranges


async def finish_job(conn: asyncpg.Connection, job_id: int) -> bool:
    """If every chunk is done, give each duplicate row its first row's outcome and mark the job
    done; return whether the job is done. Idempotent."""
    async with conn.transaction():
        state = await conn.fetchval("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        if state == JobState.DONE:
            return True
        ingested = await conn.fetchval("SELECT ingest_done FROM jobs WHERE id = $1", job_id)
        if not ingested or await open_chunks(conn, job_id):
            return False
        spans = [(c["first_row"], c["last_row"]) for c in await conn.fetch(_DUPLICATE_CHUNKS, job_id)]
        for first, last in row_ranges(spans, DUPLICATE_BATCH_ROWS):
            await conn.execute(_COPY_OUTCOMES, job_id, first, last)
        await fold_retried_attempts(conn, job_id)
        await set_job_state(conn, job_id, JobState.DONE)
    return True


async def job_counts(conn: asyncpg.Connection, job_id: int) -> JobCounts:
    """Live counts for progress, from the small chunks table (cheap to poll). The job's own
    columns come from scalar subqueries, not a join: one statement, one plan on every version."""
    row = await conn.fetchrow(
        "SELECT (SELECT rows_read FROM jobs WHERE id = $1) AS rows_read,"
        " (SELECT state FROM jobs WHERE id = $1) AS state,"
        " coalesce(sum(fetch_rows), 0)::bigint AS to_fetch, coalesce(sum(done_rows), 0)::bigint AS fetched,"
        " coalesce(sum(ok_rows), 0)::bigint AS ok, coalesce(sum(failed_rows), 0)::bigint AS failed,"
        " coalesce(sum(invalid_rows), 0)::bigint AS invalid,"
        " coalesce(sum(input_rows - invalid_rows - fetch_rows), 0)::bigint AS duplicates,"
        " count(*) FILTER (WHERE state = 'pending') AS pending,"
        " count(*) FILTER (WHERE state = 'leased') AS leased,"
        " count(*) FILTER (WHERE state = 'done') AS done"
        " FROM chunks WHERE job_id = $1",
        job_id,
    )
    return JobCounts(**row)


# --- quarantine: a chunk that keeps killing its workers -----------------------------------------

# Holders of one chunk that die in a row before its rows are given up. A worker that dies once
# may have been killed for any reason; three, each holding that chunk alone after the first
# death (lease_chunk), point at something in the chunk itself.
QUARANTINE_AFTER = 3


class Quarantine(NamedTuple):
    chunk_no: int
    first_row: int
    last_row: int
    deaths: int
    given_up: int  # rows stored as `internal`, never fetched


@dataclass(slots=True, frozen=True)
class Released:
    """Dead workers' leases given back: the chunks each of them held, those quarantined, and the
    workers that died on chunks that had killed a worker before (a repeat: the chunk's doing)."""

    held: dict[str, list[int]]
    quarantined: list[Quarantine]
    repeats: frozenset[str] = frozenset()


async def release_dead_workers(
    conn: asyncpg.Connection, job_id: int, owners: Sequence[str], *, quarantine_after: int = QUARANTINE_AFTER,
) -> Released:
    """Give back every chunk leased by these owners, known to be dead, counting a death on each.
    A chunk at `quarantine_after` deaths is done instead: its rows still without a result are
    stored as `internal`, in the same transaction, so the job can finish."""
    async with conn.transaction():
        rows = await conn.fetch(
            # Locked in chunk order, as result writes lock them: two transactions never wait on
            # each other in a cycle.
            "WITH held AS (SELECT chunk_no, lease_owner FROM chunks WHERE job_id = $1 AND state = 'leased'"
            "              AND lease_owner = ANY($2::text[]) ORDER BY chunk_no FOR UPDATE)"
            " UPDATE chunks c SET deaths = c.deaths + 1, lease_owner = NULL, lease_expires = NULL,"
            "   state = CASE WHEN c.deaths + 1 >= $3 THEN 'done' ELSE 'pending' END,"
            "   quarantined = c.deaths + 1 >= $3"
            " FROM held WHERE c.job_id = $1 AND c.chunk_no = held.chunk_no"
            " RETURNING c.chunk_no, held.lease_owner, c.deaths, c.quarantined, c.first_row, c.last_row",
            job_id, list(owners), quarantine_after,
        )
        held: dict[str, list[int]] = {}
        first_deaths: set[str] = set()  # owners that held a chunk no worker had died on before
        quarantined = []
        for r in sorted(rows, key=lambda r: r["chunk_no"]):
            held.setdefault(r["lease_owner"], []).append(r["chunk_no"])
            if r["deaths"] == 1:
                first_deaths.add(r["lease_owner"])
            if r["quarantined"]:
                given_up = await _give_up_rows(conn, job_id, r["chunk_no"], r["first_row"], r["last_row"],
                                               f"workers died {r['deaths']} times on this chunk"
                                               f" (chunk {r['chunk_no']}, rows {r['first_row']}-{r['last_row']});"
                                               f" not fetched")
                quarantined.append(Quarantine(r["chunk_no"], r["first_row"], r["last_row"], r["deaths"], given_up))
    return Released(held, quarantined, frozenset(held) - first_deaths)


async def _give_up_rows(conn: asyncpg.Connection, job_id: int, chunk_no: int, first_row: int, last_row: int,
                        reason: str) -> int:
    """The chunk's rows still without a result become `internal` results; its counts say so."""
    given_up = await conn.fetch(
        "INSERT INTO results (job_id, row_no, error_kind, error, attempts, from_cache)"
        " SELECT q.job_id, q.row_no, 'internal', $4, 0, false FROM requests q"
        " WHERE q.job_id = $1 AND q.row_no BETWEEN $2 AND $3 AND q.dup_of IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = $1 AND r.row_no = q.row_no)"
        " ON CONFLICT DO NOTHING RETURNING row_no",
        job_id, first_row, last_row, reason,
    )
    await conn.execute(
        "UPDATE chunks SET done_rows = fetch_rows, failed_rows = failed_rows + $3 WHERE job_id = $1 AND chunk_no = $2",
        job_id, chunk_no, len(given_up),
    )
    return len(given_up)


async def quarantined_chunks(conn: asyncpg.Connection, job_id: int) -> list[Quarantine]:
    rows = await conn.fetch(
        "SELECT c.chunk_no, c.first_row, c.last_row, c.deaths,"
        " (SELECT count(*) FROM results r WHERE r.job_id = $1 AND r.row_no BETWEEN c.first_row AND c.last_row"
        "  AND r.error_kind = 'internal' AND r.attempts = 0 AND NOT r.from_cache) AS given_up"
        " FROM chunks c WHERE c.job_id = $1 AND c.quarantined ORDER BY c.chunk_no",
        job_id,
    )
    return [Quarantine(r["chunk_no"], r["first_row"], r["last_row"], r["deaths"], r["given_up"]) for r in rows]


# --- retry: fetch a finished job's failed rows again ----------------------------------------------

# Rows per statement of the walks below: each is a primary-key range scan, whatever the
# statistics say of a job that may be newer than them.
RANGE_ROWS = 10_000


class Reopened(NamedTuple):
    rows: int  # results deleted, duplicates included
    fetches: int  # of them, the rows to fetch again (the duplicates share their outcome)
    chunks: int  # chunks made pending again


async def reopen_for_retry(conn: asyncpg.Connection, job_id: int, *, kinds: Sequence[str],
                           statuses: Sequence[tuple[int, int]]) -> Reopened | None:
    """Make a finished job fetch again the rows whose result has one of these error kinds, or is
    an `http_status` within one of these (low, high) status ranges. One transaction: their
    results are deleted (with their stored bodies, and the answers this job left in the
    cross-job cache), their attempts kept in `retried` to be added to the new ones, their chunks'
    counts taken back and the chunks made pending, the job running.
    Duplicate rows sharing such an outcome are deleted too; finish_job gives them the new one.
    Returns None when the job is not done (nothing is changed)."""
    kinds = [k for k in kinds if k != ErrorKind.HTTP_STATUS]
    lows, highs = [lo for lo, _ in statuses], [hi for _, hi in statuses]
    async with conn.transaction():
        job = await conn.fetchrow("SELECT state, rows_read FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        if job is None or job["state"] != JobState.DONE:
            return None
        rows = fetches = 0
        chunks: dict[int, int] = {}  # chunk -> fetched rows of it reopened
        for first in range(1, job["rows_read"] + 1, RANGE_ROWS):
            last = first + RANGE_ROWS - 1
            picked = await conn.fetch(
                "WITH picked AS (DELETE FROM results r WHERE r.job_id = $1 AND r.row_no BETWEEN $2 AND $3"
                "   AND (r.error_kind = ANY($4::text[]) OR (r.error_kind = 'http_status' AND EXISTS ("
                "        SELECT 1 FROM unnest($5::int[], $6::int[]) AS s(lo, hi)"
                "        WHERE r.status BETWEEN s.lo AND s.hi)))"
                "   RETURNING r.row_no, r.attempts)"
                # One primary-key probe per picked row: a LATERAL subquery with a LIMIT is never
                # made a join, which PostgreSQL 15 planned as a rescan of the range per row.
                " SELECT p.row_no, p.attempts, q.chunk_no, q.dup_of IS NOT NULL AS duplicate"
                " FROM picked p CROSS JOIN LATERAL (SELECT chunk_no, dup_of FROM requests"
                "      WHERE job_id = $1 AND row_no = p.row_no LIMIT 1) AS q",
                job_id, first, last, kinds, lows, highs,
            )
            if not picked:
                continue
            rows += len(picked)
            fetched = [r for r in picked if not r["duplicate"]]
            fetches += len(fetched)
            for r in fetched:
                chunks[r["chunk_no"]] = chunks.get(r["chunk_no"], 0) + 1
            await conn.copy_records_to_table(
                "retried", records=[(job_id, r["row_no"], r["attempts"]) for r in fetched],
                columns=("job_id", "row_no", "attempts"),
            )
            # The range bounds the scan where PostgreSQL 15 makes `= ANY` a filter on the job's rows.
            await conn.execute("DELETE FROM bodies WHERE job_id = $1 AND row_no BETWEEN $3 AND $4"
                               " AND row_no = ANY($2::bigint[])",
                               job_id, [r["row_no"] for r in picked], first, last)
            # The answers this job stored in the cross-job cache (--cache-ttl) for these requests
            # are the ones being asked again: served from there, nothing would be fetched.
            await conn.execute(
                "DELETE FROM response_cache WHERE job_id = $1 AND fingerprint = ANY(ARRAY("
                "  SELECT fingerprint FROM requests WHERE job_id = $1 AND row_no BETWEEN $3 AND $4"
                "  AND row_no = ANY($2::bigint[])))",
                job_id, [r["row_no"] for r in fetched], first, last,
            )
        if chunks:
            # Every reopened row was a failure: it leaves done_rows and failed_rows alike.
            await conn.execute(
                "UPDATE chunks c SET state = 'pending', done_rows = c.done_rows - w.n,"
                "   failed_rows = c.failed_rows - w.n,"
                "   lease_owner = NULL, lease_expires = NULL, deaths = 0, quarantined = false"
                " FROM unnest($2::int[], $3::int[]) AS w(chunk_no, n)"
                " WHERE c.job_id = $1 AND c.chunk_no = ANY($2::int[]) AND c.chunk_no = w.chunk_no",
                job_id, list(chunks), list(chunks.values()),
            )
        if rows:
            await conn.execute("UPDATE jobs SET state = 'running', finished_at = NULL WHERE id = $1", job_id)
    return Reopened(rows, fetches, len(chunks))


async def fold_retried_attempts(conn: asyncpg.Connection, job_id: int) -> None:
    """Add the attempts of the results a retry replaced to their new results (in finish_job's
    transaction), walking the retried rows by primary-key ranges."""
    first = await conn.fetchval("SELECT min(row_no) FROM retried WHERE job_id = $1", job_id)
    while first is not None:
        last = first + RANGE_ROWS - 1
        retried = await conn.fetch(
            "SELECT row_no, attempts FROM retried WHERE job_id = $1 AND row_no BETWEEN $2 AND $3",
            job_id, first, last,
        )
        # Row by row, each a primary-key lookup (pipelined): joined to `retried`, the results were
        # planned as a rescan of the whole range for every retried row, on 15 and 18 alike.
        await conn.executemany(
            "UPDATE results SET attempts = least(attempts + $3, 32767) WHERE job_id = $1 AND row_no = $2",
            [(job_id, r["row_no"], r["attempts"]) for r in retried],
        )
        await conn.execute("DELETE FROM retried WHERE job_id = $1 AND row_no BETWEEN $2 AND $3", job_id, first, last)
        first = await conn.fetchval("SELECT min(row_no) FROM retried WHERE job_id = $1 AND row_no > $2", job_id, last)


# --- robots.txt (--robots obey) -----------------------------------------------------------------

class RobotsRecord(NamedTuple):
    """A host's decided robots.txt as the ledger holds it (robots.RobotsOutcome's fields)."""

    verdict: str
    body: str
    reason: str


class RobotsClaims(NamedTuple):
    decided: dict[str, RobotsRecord]  # host -> its decision
    claimed: list[str]  # hosts whose robots.txt this worker now fetches; the others' are under way elsewhere


async def claim_robots(conn: asyncpg.Connection, job_id: int, hosts: Sequence[str], owner: str, *,
                       claim_seconds: float, live_seconds: float, reuse_ttl: float) -> RobotsClaims:
    """For each host: its decision if the job has one; else the right to fetch it — a host
    nobody claimed, or whose claimer stopped beating or let the claim expire (a killed worker).
    With `reuse_ttl`, a decision of another job younger than that (a robots.txt answered, not an
    outage) is this job's at once, as --cache-ttl reuses any response."""
    hosts = list(hosts)
    async with conn.transaction():
        if reuse_ttl > 0:
            await conn.execute(
                "INSERT INTO robots (job_id, host, verdict, body, reason, decided_at, reused_from)"
                " SELECT DISTINCT ON (host) $1, host, verdict, body, reason, decided_at, job_id FROM robots"
                " WHERE host = ANY($2::text[]) AND job_id <> $1 AND verdict IN ('rules', 'allow_all')"
                "   AND decided_at > now() - make_interval(secs => $3)"
                " ORDER BY host, decided_at DESC ON CONFLICT DO NOTHING",
                job_id, hosts, reuse_ttl,
            )
        claimed = [r["host"] for r in await conn.fetch(
            "INSERT INTO robots (job_id, host, owner, claim_expires)"
            " SELECT $1, h, $3, now() + make_interval(secs => $4) FROM unnest($2::text[]) AS h"
            " ON CONFLICT DO NOTHING RETURNING host",
            job_id, hosts, owner, claim_seconds,
        )]
        if len(claimed) < len(hosts):
            claimed += [r["host"] for r in await conn.fetch(
                "UPDATE robots r SET owner = $3, claim_expires = now() + make_interval(secs => $4)"
                " WHERE r.job_id = $1 AND r.host = ANY($2::text[]) AND r.verdict IS NULL AND r.owner <> $3"
                "   AND (r.claim_expires < now() OR NOT EXISTS (SELECT 1 FROM workers w"
                "        WHERE w.job_id = $1 AND w.worker_id = r.owner AND w.stopped_at IS NULL"
                "          AND w.heartbeat_at > now() - make_interval(secs => $5)))"
                " RETURNING r.host",
                job_id, hosts, owner, claim_seconds, live_seconds,
            )]
        decided = await conn.fetch(
            "SELECT host, verdict, body, reason FROM robots"
            " WHERE job_id = $1 AND host = ANY($2::text[]) AND verdict IS NOT NULL",
            job_id, hosts,
        )
    return RobotsClaims({r["host"]: RobotsRecord(r["verdict"], r["body"] or "", r["reason"] or "") for r in decided},
                        claimed)


async def decide_robots(conn: asyncpg.Connection, job_id: int, host: str, record: RobotsRecord,
                        attempts: int) -> RobotsRecord:
    """Store a host's decision, unless another worker stored one first (ours was presumed dead):
    return the decision that holds, the same for every worker. One statement: the outer SELECT
    reads the row as it was before the UPDATE, which is the other worker's decision when ours
    was not stored."""
    row = await conn.fetchrow(
        "WITH stored AS (UPDATE robots SET verdict = $3, body = $4, reason = $5, attempts = $6, decided_at = now(),"
        "   owner = NULL, claim_expires = NULL WHERE job_id = $1 AND host = $2 AND verdict IS NULL"
        "   RETURNING verdict, body, reason)"
        " SELECT verdict, body, reason FROM stored"
        " UNION ALL SELECT verdict, body, reason FROM robots WHERE job_id = $1 AND host = $2"
        "   AND verdict IS NOT NULL AND NOT EXISTS (SELECT 1 FROM stored)",
        job_id, host, record.verdict, record.body, record.reason, attempts,
    )
    return RobotsRecord(row["verdict"], row["body"] or "", row["reason"] or "") if row else record


async def robots_counts(conn: asyncpg.Connection, job_id: int) -> dict:
    """{"hosts": {verdict: hosts}, "requests": robots.txt requests made}; a decision reused from
    another job made none. One primary-key range of a small table (empty under `ignore`)."""
    rows = await conn.fetch(
        "SELECT verdict, count(*) AS hosts, coalesce(sum(attempts), 0) AS fetches FROM robots"
        " WHERE job_id = $1 AND verdict IS NOT NULL GROUP BY verdict",
        job_id,
    )
    return {"hosts": {r["verdict"]: r["hosts"] for r in rows}, "requests": sum(r["fetches"] for r in rows)}


async def renew_robots_claims(conn: asyncpg.Connection, job_id: int, owner: str, claim_seconds: float) -> None:
    await conn.execute(
        "UPDATE robots SET claim_expires = now() + make_interval(secs => $3)"
        " WHERE job_id = $1 AND owner = $2 AND verdict IS NULL",
        job_id, owner, claim_seconds,
    )


async def release_robots_claims(conn: asyncpg.Connection, job_id: int, owner: str) -> None:
    """A draining worker's unfinished robots.txt fetches, given back for the next to take at once."""
    await conn.execute("DELETE FROM robots WHERE job_id = $1 AND owner = $2 AND verdict IS NULL", job_id, owner)
