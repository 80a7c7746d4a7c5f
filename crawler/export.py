"""Streams a job's outcomes out of PostgreSQL, one record per input row, as JSON lines, CSV or
Parquet. A server-side cursor and bounded batches keep memory constant whatever the job's size;
nothing here holds a whole job."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import sys
from typing import Any, AsyncIterator

import aiofiles
import asyncpg
import orjson

from crawler.errors import UsageError

FIELDS = (
    "row", "url", "status", "final_url", "error_kind", "error", "attempts", "from_cache",
    "elapsed_ms", "body_bytes", "body_sha256",
)
FORMATS = ("jsonl", "csv", "parquet")
PARQUET_BATCH_ROWS = 10_000  # rows per record batch (and row group): a few MB, whatever the job's size

# Each query reads one table's rows in primary-key order, so the export streams in row order at
# constant memory; the two streams are merged here. One join in one UNION would have to be sorted
# whole before its first row, and a job exported right after its crawl is newer than the table
# statistics: the planner then expects one row and nests loops, quadratic in the job's size.
_VALID = """
SELECT q.row_no AS row, q.url, r.status, r.final_url, r.error_kind, r.error, r.attempts, r.from_cache,
       r.elapsed_ms, r.body_bytes, encode(r.body_sha256, 'hex') AS body_sha256
FROM requests q LEFT JOIN results r ON r.job_id = q.job_id AND r.row_no = q.row_no
WHERE q.job_id = $1 {only}
ORDER BY q.row_no
"""
_INVALID = """
SELECT i.row_no AS row, i.raw AS url, NULL::smallint AS status, NULL::text AS final_url,
       'invalid_url' AS error_kind, i.reason AS error, 0::smallint AS attempts, false AS from_cache,
       NULL::real AS elapsed_ms, NULL::bigint AS body_bytes, NULL::text AS body_sha256
FROM invalid_rows i WHERE i.job_id = $1
ORDER BY i.row_no
"""
# There is one plan that streams: ordered primary-key scans, merge-joined. Stale statistics must
# not talk the planner out of it, so for the export's own transaction the others are off.
_STREAMING_PLAN = (
    "SET LOCAL enable_nestloop = off", "SET LOCAL enable_hashjoin = off", "SET LOCAL enable_sort = off",
    "SET LOCAL enable_seqscan = off", "SET LOCAL enable_bitmapscan = off",
)

# A row is ok when it was fetched (or served from the cache) without an error; failed when its
# result has an error kind; invalid when it could not be a request. A row not fetched yet is none.
ONLY = {
    "ok": "AND r.row_no IS NOT NULL AND r.error_kind IS NULL",
    "failed": "AND r.error_kind IS NOT NULL",
    "invalid": None,
}


async def _merge_by_row(valid: AsyncIterator[asyncpg.Record] | None,
                        invalid: AsyncIterator[asyncpg.Record] | None) -> AsyncIterator[asyncpg.Record]:
    """Merge two streams, each in row order, into one in row order (row numbers are unique)."""
    if valid is None or invalid is None:
        async for record in valid or invalid:
            yield record
        return
    x, y = await anext(valid, None), await anext(invalid, None)
    while x is not None and y is not None:
        if x["row"] < y["row"]:
            yield x
            x = await anext(valid, None)
        else:
            yield y
            y = await anext(invalid, None)
    rest, head = (valid, x) if x is not None else (invalid, y)
    if head is not None:
        yield head
        async for record in rest:
            yield record


async def export_records(conn: asyncpg.Connection, job_id: int, *, only: str | None = None,
                         prefetch: int = 2000) -> AsyncIterator[asyncpg.Record]:
    """Every input row of the job in row order (or only the ok, failed or invalid ones), with
    the columns of FIELDS; from server-side cursors, `prefetch` rows at a time."""
    if only is not None and only not in ONLY:
        raise UsageError(f"--only must be one of {', '.join(ONLY)}, not '{only}'.")
    async with conn.transaction(readonly=True):
        for setting in _STREAMING_PLAN:
            await conn.execute(setting)
        valid = invalid = None
        if only != "invalid":
            query = _VALID.format(only=ONLY[only] if only else "")
            valid = conn.cursor(query, job_id, prefetch=prefetch).__aiter__()
        if only in (None, "invalid"):
            invalid = conn.cursor(_INVALID, job_id, prefetch=prefetch).__aiter__()
        async for record in _merge_by_row(valid, invalid):
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


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule is what writes the file
    except ImportError:
        raise UsageError("parquet export needs pyarrow: pip install 'crawler[parquet]'.") from None
    return pyarrow


def parquet_schema(pa: Any) -> Any:
    """The export's columns with the database's types: every one nullable but row and url (a row
    not yet fetched has no result; an invalid row has no status)."""
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("status", pa.int16()),
        pa.field("final_url", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int16()),
        pa.field("from_cache", pa.bool_()),
        pa.field("elapsed_ms", pa.float32()),  # `real` in PostgreSQL
        pa.field("body_bytes", pa.int64()),
        pa.field("body_sha256", pa.string()),  # hex, as in the other formats
    ])


async def _export_parquet(conn: asyncpg.Connection, job_id: int, path: str, only: str | None) -> int:
    pa = _pyarrow()
    schema = parquet_schema(pa)
    writer = pa.parquet.ParquetWriter(path, schema, compression="zstd")

    def write(columns: list[list]) -> None:
        writer.write_batch(pa.record_batch(columns, schema=schema))

    count = 0
    columns: list[list] = [[] for _ in FIELDS]
    try:
        async for record in export_records(conn, job_id, only=only):
            for values, name in zip(columns, FIELDS):
                values.append(record[name])
            count += 1
            if len(columns[0]) >= PARQUET_BATCH_ROWS:
                # Encoding and compression run in a thread while the cursor keeps the loop.
                await asyncio.to_thread(write, columns)
                columns = [[] for _ in FIELDS]
        if columns[0]:
            await asyncio.to_thread(write, columns)
        await asyncio.to_thread(writer.close)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            os.unlink(path)  # a Parquet file without its footer cannot be read: leave none
        raise
    return count


async def export_job(conn: asyncpg.Connection, job_id: int, *, fmt: str, path: str | None,
                     only: str | None = None) -> int:
    """Write the export to `path` (or stdout, for jsonl and csv); return the number of records."""
    to_stdout = path is None or path == "-"
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if only is not None and only not in ONLY:
        raise UsageError(f"--only must be one of {', '.join(ONLY)}, not '{only}'.")
    if fmt == "parquet":
        if to_stdout:
            raise UsageError("parquet cannot be written to standard output; name a file with -o PATH.")
        return await _export_parquet(conn, job_id, path, only)
    line = _jsonl if fmt == "jsonl" else _csv_line
    count = 0
    if to_stdout:
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
