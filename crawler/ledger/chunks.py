"""Chunks in the ledger: the input stored chunk by chunk, each row checked against the job's
earlier fingerprints, and chunks leased to workers.

Chunks are leased with FOR UPDATE SKIP LOCKED and carry a fencing number; a result write locks
its chunk's row and checks the fence (results.py), so a worker that lost its lease cannot commit
over the new holder. Who calls what, from which process: docs/ARCHITECTURE.md."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

from crawler.job.inputs import InvalidRow, RequestRow


class Lease(NamedTuple):
    """A chunk as leased: its number and the fence that lease got. Looked up and compared a few
    times per request (a tuple's hash and equality run in C; a dataclass's in Python)."""

    chunk_no: int
    fence: int


@dataclass(slots=True, frozen=True)
class LeasedChunk:
    lease: Lease
    first_row: int
    last_row: int


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
    conn: asyncpg.Connection,
    job_id: int,
    chunk_no: int,
    rows: Sequence[RequestRow | InvalidRow],
    *,
    dedup: bool = True,
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
    conn: asyncpg.Connection,
    job_id: int,
    chunk_no: int,
    rows: Sequence[RequestRow | InvalidRow],
    requests: list[RequestRow],
    first: dict[bytes, int],
    *,
    all_new: bool,
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
                    "fingerprints",
                    records=[(job_id, f, r) for f, r in first.items()],
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
            records.append(
                (
                    job_id,
                    r.row,
                    chunk_no,
                    r.method,
                    r.url,
                    r.fingerprint,
                    r.headers,
                    r.body,
                    r.normalized,
                    r.given,
                    None if dup_of == r.row else dup_of,
                )
            )
        fetch_rows = sum(1 for record in records if record[-1] is None)
        if records:
            await conn.copy_records_to_table(
                "requests",
                records=records,
                columns=(
                    "job_id",
                    "row_no",
                    "chunk_no",
                    "method",
                    "url",
                    "fingerprint",
                    "headers",
                    "body",
                    "normalized_url",
                    "given_url",
                    "dup_of",
                ),
            )
        await conn.execute(
            "INSERT INTO chunks (job_id, chunk_no, first_row, last_row, fetch_rows, input_rows, invalid_rows, state)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $5 = 0 THEN 'done' ELSE 'pending' END)",
            job_id,
            chunk_no,
            rows[0].row,
            rows[-1].row,
            fetch_rows,
            len(rows),
            len(invalid),
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
        job_id,
        owner,
        lease_seconds,
    )
    return LeasedChunk(Lease(row["chunk_no"], row["fence"]), row["first_row"], row["last_row"]) if row else None


async def renew_leases(
    conn: asyncpg.Connection, job_id: int, leases: Iterable[Lease], lease_seconds: float
) -> set[int]:
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
        job_id,
        [lease.chunk_no for lease in leases],
        [lease.fence for lease in leases],
        lease_seconds,
    )
    return {r["chunk_no"] for r in rows}


async def release_chunk(conn: asyncpg.Connection, job_id: int, lease: Lease) -> None:
    """Give a chunk back unfinished, so another worker (or a resume) takes it at once."""
    await conn.execute(
        "UPDATE chunks SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
        " WHERE job_id = $1 AND chunk_no = $2 AND fence = $3 AND state = 'leased'",
        job_id,
        lease.chunk_no,
        lease.fence,
    )


async def release_leases_of(conn: asyncpg.Connection, job_id: int, owners: Sequence[str]) -> int:
    """Give back every chunk leased by these owners, known to be dead, so that the work is
    redone now rather than when the leases expire."""
    result = await conn.execute(
        "UPDATE chunks SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
        " WHERE job_id = $1 AND state = 'leased' AND lease_owner = ANY($2::text[])",
        job_id,
        list(owners),
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
        job_id,
        chunk.first_row,
        chunk.last_row,
    )
    if chunk.lease.fence == 1:
        return rows
    done = {
        r["row_no"]
        for r in await conn.fetch(
            "SELECT row_no FROM results WHERE job_id = $1 AND row_no BETWEEN $2 AND $3",
            job_id,
            chunk.first_row,
            chunk.last_row,
        )
    }
    return [r for r in rows if r["row_no"] not in done]


async def open_chunks(conn: asyncpg.Connection, job_id: int) -> int:
    return await conn.fetchval("SELECT count(*) FROM chunks WHERE job_id = $1 AND state <> 'done'", job_id)
