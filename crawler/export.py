"""Streams a job's outcomes out of PostgreSQL, one record per input row, as JSON lines, CSV or
Parquet. Keyset batches keep memory constant whatever the job's size; nothing here holds a whole
job."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiofiles
import asyncpg
import orjson

from crawler.errors import OutputError, UsageError
from crawler.export_file import ExportFile
from crawler.kinds import ErrorKind
from crawler.ledger.outcomes import invalid_batches, request_batches
from crawler.urls import mask_password

# url: the row's URL as written (an invalid row's text); normalized_url: the form duplicates
# share (none for an invalid row). A URL's password is shown as *** in every field.
FIELDS = (
    "row",
    "url",
    "normalized_url",
    "status",
    "final_url",
    "error_kind",
    "error",
    "attempts",
    "from_cache",
    "elapsed_ms",
    "body_bytes",
    "body_sha256",
)
_MASKED = tuple(i for i, name in enumerate(FIELDS) if name in ("url", "normalized_url", "final_url", "error"))
# OWASP's CSV injection rule: a spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
FORMATS = ("jsonl", "csv", "parquet")
PARQUET_BATCH_ROWS = 10_000  # rows per record batch (and row group): a few MB, whatever the job's size

_RESULT_FIELDS = (
    "status",
    "final_url",
    "error_kind",
    "error",
    "attempts",
    "from_cache",
    "elapsed_ms",
    "body_bytes",
    "body_sha256",
)
_NO_RESULT = dict.fromkeys(_RESULT_FIELDS)  # a row not fetched yet

# A row is ok when it was fetched (or served from the cache) without an error; failed when its
# result has an error kind; invalid when it could not be a request. A row not fetched yet is none.
ONLY = ("ok", "failed", "invalid")


def valid_outcomes(
    requests: list[asyncpg.Record], results: list[asyncpg.Record], only: str | None = None
) -> list[dict]:
    """One export record per request, in the requests' order, each with its result if it has
    one, its keys in FIELDS order; with `only`, just the ok or the failed ones."""
    by_row = {r["row_no"]: r for r in results}
    records = []
    for q in requests:
        r = by_row.get(q["row_no"])
        if only == "ok" and (r is None or r["error_kind"] is not None):
            continue
        if only == "failed" and (r is None or r["error_kind"] is None):
            continue
        record = {"row": q["row_no"], "url": q["url"], "normalized_url": q["normalized_url"]}
        if r is None:
            record.update(_NO_RESULT)
        else:
            for name in _RESULT_FIELDS:
                record[name] = r[name]
        records.append(record)
    return records


def invalid_outcome(row: asyncpg.Record) -> dict:
    return {
        "row": row["row_no"],
        "url": row["raw"],
        "normalized_url": None,
        "status": None,
        "final_url": None,
        "error_kind": ErrorKind.INVALID_URL.value,
        "error": row["reason"],
        "attempts": 0,
        "from_cache": False,
        "elapsed_ms": None,
        "body_bytes": None,
        "body_sha256": None,
    }


async def _valid_records(conn: asyncpg.Connection, job_id: int, only: str | None) -> AsyncIterator[dict]:
    async for requests, results in request_batches(conn, job_id):
        for record in valid_outcomes(requests, results, only):
            yield record


async def _invalid_records(conn: asyncpg.Connection, job_id: int) -> AsyncIterator[dict]:
    async for rows in invalid_batches(conn, job_id):
        for row in rows:
            yield invalid_outcome(row)


async def _merge_by_row(valid: AsyncIterator[dict] | None, invalid: AsyncIterator[dict] | None) -> AsyncIterator[dict]:
    """Merge two streams, each in row order, into one in row order (row numbers are unique)."""
    if valid is None or invalid is None:
        only = valid or invalid
        assert only is not None, "export_records asks for at least one of the two"
        async for record in only:
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


async def export_records(
    conn: asyncpg.Connection, job_id: int, *, only: str | None = None
) -> AsyncGenerator[dict, None]:
    """Every input row of the job in row order (or only the ok, failed or invalid ones), as dicts
    with the keys of FIELDS; ledger.outcomes.BATCH_ROWS rows of each table at a time."""
    if only is not None and only not in ONLY:
        raise UsageError(f"--only must be one of {', '.join(ONLY)}, not '{only}'.")
    # One snapshot for all the batches: an export of a running job is the job at one moment.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        valid = _valid_records(conn, job_id, only) if only != "invalid" else None
        invalid = _invalid_records(conn, job_id) if only in (None, "invalid") else None
        async for record in _merge_by_row(valid, invalid):
            yield record


def shown(record: dict) -> list:
    """A record's values in FIELDS order, each URL's password (and one in an error) as ***."""
    values = list(record.values())
    for i in _MASKED:
        if values[i] is not None and "@" in values[i]:
            values[i] = mask_password(values[i])
    return values


def _jsonl(record: dict) -> str:
    return orjson.dumps(dict(zip(FIELDS, shown(record), strict=True))).decode() + "\n"


def neutralized(value: object) -> object:
    """A cell a spreadsheet would run as a formula, prefixed with "'" so it shows as text (OWASP)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _csv_line(record: dict) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if value is None else neutralized(value) for value in shown(record)])
    return buf.getvalue()


def _csv_raw_line(record: dict) -> str:
    """A CSV line with every cell as stored (--csv-raw): for programs, not spreadsheets."""
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if value is None else value for value in shown(record)])
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
    return pa.schema(
        [
            pa.field("row", pa.int64(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("normalized_url", pa.string()),  # none for an invalid row
            pa.field("status", pa.int16()),
            pa.field("final_url", pa.string()),
            pa.field("error_kind", pa.string()),
            pa.field("error", pa.string()),
            pa.field("attempts", pa.int16()),
            pa.field("from_cache", pa.bool_()),
            pa.field("elapsed_ms", pa.float32()),  # `real` in PostgreSQL
            pa.field("body_bytes", pa.int64()),
            pa.field("body_sha256", pa.string()),  # hex, as in the other formats
        ]
    )


async def _export_parquet(conn: asyncpg.Connection, job_id: int, out: ExportFile, only: str | None) -> int:
    pa = _pyarrow()
    schema = parquet_schema(pa)
    with out.errors():
        writer = pa.parquet.ParquetWriter(out.name, schema, compression="zstd")

    def write(columns: list[list]) -> None:
        with out.errors():
            writer.write_batch(pa.record_batch(columns, schema=schema))

    count = 0
    columns: list[list] = [[] for _ in FIELDS]
    try:
        async with contextlib.aclosing(export_records(conn, job_id, only=only)) as records:
            async for record in records:
                for values, value in zip(columns, shown(record), strict=True):
                    values.append(value)
                count += 1
                if len(columns[0]) >= PARQUET_BATCH_ROWS:
                    # Encoding and compression run in a thread while the reading keeps the loop.
                    await asyncio.to_thread(write, columns)
                    columns = [[] for _ in FIELDS]
        if columns[0]:
            await asyncio.to_thread(write, columns)
        with out.errors():
            await asyncio.to_thread(writer.close)
    except BaseException:
        with contextlib.suppress(OSError):
            writer.close()  # a Parquet file without its footer cannot be read: ExportFile removes it
        raise
    return count


def export_file(path: str | None, fmt: str) -> ExportFile | None:
    """The file `-o PATH` names, checked before any work; None for standard output."""
    if fmt == "parquet" and (path is None or path == "-"):
        raise UsageError("parquet cannot be written to standard output; name a file with -o PATH.")
    return None if path is None or path == "-" else ExportFile(path)


async def export_job(
    conn: asyncpg.Connection,
    job_id: int,
    *,
    fmt: str,
    path: str | None,
    only: str | None = None,
    out: ExportFile | None = None,
    csv_raw: bool = False,
) -> int:
    """Write the export to `path` (or stdout, for jsonl and csv); return the number of records.
    A failed export leaves no file behind (`out`: the file as export_file() checked it). A CSV
    cell that a spreadsheet would run as a formula is prefixed with "'", unless csv_raw."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if only is not None and only not in ONLY:
        raise UsageError(f"--only must be one of {', '.join(ONLY)}, not '{only}'.")
    if out is None:
        out = export_file(path, fmt)
    line = _jsonl if fmt == "jsonl" else _csv_raw_line if csv_raw else _csv_line
    if out is None:
        return await _export_stdout(conn, job_id, line=line, fmt=fmt, only=only)
    with out:
        if fmt == "parquet":
            return await _export_parquet(conn, job_id, out, only)
        return await _export_text(conn, job_id, out, line=line, fmt=fmt, only=only)


async def _export_stdout(
    conn: asyncpg.Connection, job_id: int, *, line: Callable[[dict], str], fmt: str, only: str | None
) -> int:
    count = 0
    out = sys.stdout
    # Each write is guarded on its own: the stream between them may raise the database's own
    # OSErrors (a connection reset), which are not standard output's.
    try:
        if fmt == "csv":
            out.write(_csv_header())
    except OSError as exc:
        raise _stdout_error(exc) from None
    async with contextlib.aclosing(export_records(conn, job_id, only=only)) as records:
        async for record in records:
            text = line(record)
            try:
                out.write(text)
            except OSError as exc:
                raise _stdout_error(exc) from None
            count += 1
    try:
        out.flush()
    except OSError as exc:
        raise _stdout_error(exc) from None
    return count


def _stdout_error(exc: OSError) -> Exception:
    if isinstance(exc, BrokenPipeError):
        return exc  # `crawler export | head`: the reader is done, and that is fine (cli.py)
    return OutputError(f"cannot write the export to standard output: {exc.strerror or type(exc).__name__}.")


async def _export_text(
    conn: asyncpg.Connection, job_id: int, file: ExportFile, *, line: Callable[[dict], str], fmt: str, only: str | None
) -> int:
    count = 0
    with file.errors():
        out = await aiofiles.open(file.name, "w", encoding="utf-8", newline="")
    try:
        if fmt == "csv":
            with file.errors():
                await out.write(_csv_header())
        pending: list[str] = []
        # Closed on the way out whatever happens: an export abandoned mid-stream would leave its
        # transaction open when the connection closes.
        async with contextlib.aclosing(export_records(conn, job_id, only=only)) as records:
            async for record in records:
                pending.append(line(record))
                count += 1
                if len(pending) >= 1000:  # one write per thousand rows: aiofiles pays a thread hop per call
                    with file.errors():
                        await out.write("".join(pending))
                    pending.clear()
        with file.errors():
            if pending:
                await out.write("".join(pending))
            await out.flush()  # a full disk shows here, or at close: both before the rename
    finally:
        with file.errors():
            await out.close()
    return count
