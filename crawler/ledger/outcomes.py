"""A job's rows and their outcomes read back for `crawler export`, in row order, a batch at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg

BATCH_ROWS = 5000  # rows per query: a few MB, whatever the job's size

# A job is read in keyset batches over the primary keys (job_id, row_no): the next BATCH_ROWS
# requests after the last row seen, the results of exactly that row range, and likewise the
# invalid rows; crawler/export.py merges the streams by row number. Every query reads one table by its
# primary key, a plan no statistics and no planner version can change, so the export costs the
# same, linear in the job, on every PostgreSQL. A join of requests and results cannot promise
# that: a job exported right after its crawl is newer than the table statistics, the planner
# expects it to have one row, and PostgreSQL 15 nests loops whose inner scan reads the whole job
# for every row (a 100 000-row export not done after 10 minutes, where PostgreSQL 18 took 1.6 s).
# Filters (--only) are applied in crawler/export.py, not in SQL: a filtered scan under a LIMIT is planned from
# the statistics of the filtered column, which lag a job exactly as its size does.
_REQUESTS = (
    "SELECT row_no, coalesce(given_url, url) AS url, coalesce(normalized_url, url) AS normalized_url"
    " FROM requests WHERE job_id = $1 AND row_no > $2"
    f" ORDER BY row_no LIMIT {BATCH_ROWS}"
)
_RESULTS = (
    "SELECT row_no, status, final_url, error_kind, error, attempts, from_cache, elapsed_ms, body_bytes,"
    " encode(body_sha256, 'hex') AS body_sha256"
    " FROM results WHERE job_id = $1 AND row_no BETWEEN $2 AND $3"
)
_INVALID = (
    f"SELECT row_no, raw, reason FROM invalid_rows WHERE job_id = $1 AND row_no > $2 ORDER BY row_no LIMIT {BATCH_ROWS}"
)


async def request_batches(
    conn: asyncpg.Connection, job_id: int
) -> AsyncIterator[tuple[list[asyncpg.Record], list[asyncpg.Record]]]:
    """The job's requests, BATCH_ROWS at a time in row order, each batch with the results of its
    row range (a row not fetched yet has none)."""
    after = -1
    while requests := await conn.fetch(_REQUESTS, job_id, after):
        after = requests[-1]["row_no"]
        yield requests, await conn.fetch(_RESULTS, job_id, requests[0]["row_no"], after)
        if len(requests) < BATCH_ROWS:
            return


async def invalid_batches(conn: asyncpg.Connection, job_id: int) -> AsyncIterator[list[asyncpg.Record]]:
    """The job's invalid rows, BATCH_ROWS at a time in row order."""
    after = -1
    while rows := await conn.fetch(_INVALID, job_id, after):
        after = rows[-1]["row_no"]
        yield rows
        if len(rows) < BATCH_ROWS:
            return
