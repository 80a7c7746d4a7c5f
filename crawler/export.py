"""Streams a job's outcomes out of PostgreSQL, one record per input row, as JSON lines or CSV.

A server-side cursor and asynchronous file writes keep memory constant whatever the job's size.
"""

from __future__ import annotations

import csv
import io
import sys
from typing import AsyncIterator

import aiofiles
import asyncpg
import orjson

FIELDS = (
    "row", "url", "status", "final_url", "error_kind", "error", "attempts", "from_cache",
    "elapsed_ms", "body_bytes", "body_sha256",
)

# Valid rows with their result, merged in row order with the invalid rows (as error_kind invalid_url).
_QUERY = """
SELECT q.row_no AS row, q.url, r.status, r.final_url, r.error_kind, r.error, r.attempts, r.from_cache,
       r.elapsed_ms, r.body_bytes, encode(r.body_sha256, 'hex') AS body_sha256, false AS invalid
FROM requests q LEFT JOIN results r USING (job_id, row_no)
WHERE q.job_id = $1
UNION ALL
SELECT i.row_no, i.raw, NULL, NULL, 'invalid_url', i.reason, 0, false, NULL, NULL, NULL, true
FROM invalid_rows i WHERE i.job_id = $1
ORDER BY row
"""

ONLY = {
    "ok": "WHERE NOT invalid AND error_kind IS NULL",
    "failed": "WHERE NOT invalid AND error_kind IS NOT NULL",
    "invalid": "WHERE invalid",
}


async def export_records(conn: asyncpg.Connection, job_id: int, *, only: str | None = None,
                         prefetch: int = 2000) -> AsyncIterator[asyncpg.Record]:
    query = _QUERY if only is None else f"SELECT * FROM ({_QUERY}) AS e {ONLY[only]} ORDER BY row"
    async with conn.transaction(readonly=True):
        async for record in conn.cursor(query, job_id, prefetch=prefetch):
            yield record


def _jsonl(record: asyncpg.Record) -> str:
    return orjson.dumps({name: record[name] for name in FIELDS}).decode() + "\n"


def _csv_line(record: asyncpg.Record) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if record[name] is None else record[name] for name in FIELDS])
    return buf.getvalue()


def _csv_header() -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(FIELDS)
    return buf.getvalue()


async def export_job(conn: asyncpg.Connection, job_id: int, *, fmt: str, path: str | None,
                     only: str | None = None) -> int:
    """Write the export to `path` (or stdout); return the number of records written."""
    line = _jsonl if fmt == "jsonl" else _csv_line
    count = 0
    if path is None or path == "-":
        out = sys.stdout
        if fmt == "csv":
            out.write(_csv_header())
        async for record in export_records(conn, job_id, only=only):
            out.write(line(record))
            count += 1
        out.flush()
        return count
    async with aiofiles.open(path, "w", encoding="utf-8", newline="") as out:
        if fmt == "csv":
            await out.write(_csv_header())
        pending: list[str] = []
        async for record in export_records(conn, job_id, only=only):
            pending.append(line(record))
            count += 1
            if len(pending) >= 1000:  # one write per thousand rows: aiofiles pays a thread hop per call
                await out.write("".join(pending))
                pending.clear()
        if pending:
            await out.write("".join(pending))
    return count
