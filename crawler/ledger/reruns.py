"""`crawler retry`: a finished job's failed rows made to fetch again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import asyncpg

from crawler.kinds import ErrorKind
from crawler.states import JobState

# Rows per statement of the walks below: each is a primary-key range scan, whatever the
# statistics say of a job that may be newer than them.
RANGE_ROWS = 10_000


class Reopened(NamedTuple):
    rows: int  # results deleted, duplicates included
    fetches: int  # of them, the rows to fetch again (the duplicates share their outcome)
    chunks: int  # chunks made pending again


async def reopen_for_retry(
    conn: asyncpg.Connection, job_id: int, *, kinds: Sequence[str], statuses: Sequence[tuple[int, int]]
) -> Reopened | None:
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
                job_id,
                first,
                last,
                kinds,
                lows,
                highs,
            )
            if not picked:
                continue
            rows += len(picked)
            fetched = [r for r in picked if not r["duplicate"]]
            fetches += len(fetched)
            for r in fetched:
                chunks[r["chunk_no"]] = chunks.get(r["chunk_no"], 0) + 1
            await conn.copy_records_to_table(
                "retried",
                records=[(job_id, r["row_no"], r["attempts"]) for r in fetched],
                columns=("job_id", "row_no", "attempts"),
            )
            # The range bounds the scan where PostgreSQL 15 makes `= ANY` a filter on the job's rows.
            await conn.execute(
                "DELETE FROM bodies WHERE job_id = $1 AND row_no BETWEEN $3 AND $4 AND row_no = ANY($2::bigint[])",
                job_id,
                [r["row_no"] for r in picked],
                first,
                last,
            )
            # The answers this job stored in the cross-job cache (--cache-ttl) for these requests
            # are the ones being asked again: served from there, nothing would be fetched.
            await conn.execute(
                "DELETE FROM response_cache WHERE job_id = $1 AND fingerprint = ANY(ARRAY("
                "  SELECT fingerprint FROM requests WHERE job_id = $1 AND row_no BETWEEN $3 AND $4"
                "  AND row_no = ANY($2::bigint[])))",
                job_id,
                [r["row_no"] for r in fetched],
                first,
                last,
            )
        if chunks:
            # Every reopened row was a failure: it leaves done_rows and failed_rows alike.
            await conn.execute(
                "UPDATE chunks c SET state = 'pending', done_rows = c.done_rows - w.n,"
                "   failed_rows = c.failed_rows - w.n,"
                "   lease_owner = NULL, lease_expires = NULL, deaths = 0, quarantined = false"
                " FROM unnest($2::int[], $3::int[]) AS w(chunk_no, n)"
                " WHERE c.job_id = $1 AND c.chunk_no = ANY($2::int[]) AND c.chunk_no = w.chunk_no",
                job_id,
                list(chunks),
                list(chunks.values()),
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
            job_id,
            first,
            last,
        )
        # Row by row, each a primary-key lookup (pipelined): joined to `retried`, the results were
        # planned as a rescan of the whole range for every retried row, on 15 and 18 alike.
        await conn.executemany(
            "UPDATE results SET attempts = least(attempts + $3, 32767) WHERE job_id = $1 AND row_no = $2",
            [(job_id, r["row_no"], r["attempts"]) for r in retried],
        )
        await conn.execute("DELETE FROM retried WHERE job_id = $1 AND row_no BETWEEN $2 AND $3", job_id, first, last)
        first = await conn.fetchval("SELECT min(row_no) FROM retried WHERE job_id = $1 AND row_no > $2", job_id, last)
