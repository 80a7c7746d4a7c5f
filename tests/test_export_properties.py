"""Export round-trips: whatever text a row holds (its URL as read, a final URL, an error's
detail, an invalid row's raw text and reason), JSON lines, CSV and Parquet give it back exactly,
one record per row, in row order, but for what the export hides or defuses on purpose: a URL's
password (as ***, in every format) and, in CSV for spreadsheets, a cell that would run as a
formula (prefixed with "'"; --csv-raw gives it as stored)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import tempfile

import asyncpg
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crawler.export import FIELDS, export_job, neutralized
from crawler.urls import mask_password

# What PostgreSQL's text can hold: any character but NUL (the crawler makes bytes storable first).
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
VALID = st.tuples(st.just("valid"), TEXT, st.one_of(st.none(), TEXT), st.one_of(st.none(), TEXT))
INVALID = st.tuples(st.just("invalid"), TEXT, TEXT, st.none())
ROWS = st.lists(st.one_of(VALID, INVALID), min_size=1, max_size=8)


async def store(conn: asyncpg.Connection, rows: list[tuple]) -> int:
    """A finished job written straight into the tables: row n is rows[n - 1]."""
    job = await conn.fetchval(
        "INSERT INTO jobs (input, state, ingest_done) VALUES ('roundtrip', 'done', true) RETURNING id"
    )
    for n, (kind, text, final_url, error) in enumerate(rows, start=1):
        if kind == "invalid":
            await conn.execute(
                "INSERT INTO invalid_rows (job_id, row_no, raw, reason) VALUES ($1, $2, $3, $4)",
                job,
                n,
                text,
                final_url,
            )
            continue
        await conn.execute(
            "INSERT INTO requests (job_id, row_no, chunk_no, method, url, fingerprint)"
            " VALUES ($1, $2, 0, 'GET', $3, $4)",
            job,
            n,
            text,
            n.to_bytes(8, "big"),
        )
        await conn.execute(
            "INSERT INTO results (job_id, row_no, status, final_url, error_kind, error, attempts, elapsed_ms,"
            " body_bytes, body_sha256) VALUES ($1, $2, $3, $4, $5, $6, 1, 2.5, 7, '\\x0aff'::bytea)",
            job,
            n,
            None if error is not None else 200,
            final_url,
            None if error is None else "protocol",
            error,
        )
    return job


def expected(rows: list[tuple]) -> list[dict]:
    out = []
    for n, (kind, text, final_url, error) in enumerate(rows, start=1):
        if kind == "invalid":
            out.append(
                {
                    "row": n,
                    "url": mask_password(text),
                    "normalized_url": None,
                    "status": None,
                    "final_url": None,
                    "error_kind": "invalid_url",
                    "error": mask_password(final_url),
                    "attempts": 0,
                    "from_cache": False,
                    "elapsed_ms": None,
                    "body_bytes": None,
                    "body_sha256": None,
                }
            )
        else:
            out.append(
                {
                    "row": n,
                    "url": mask_password(text),
                    "normalized_url": mask_password(text),
                    "status": None if error is not None else 200,
                    "final_url": mask_password(final_url),
                    "error_kind": None if error is None else "protocol",
                    "error": mask_password(error),
                    "attempts": 1,
                    "from_cache": False,
                    "elapsed_ms": 2.5,
                    "body_bytes": 7,
                    "body_sha256": "0aff",
                }
            )
    return out


def as_csv(record: dict, *, raw: bool) -> list[str]:
    """How CSV spells a record: no types, no NULL (an empty cell), booleans and numbers as Python
    prints them; for spreadsheets, a formula-like text defused."""
    return ["" if record[name] is None else str(record[name] if raw else neutralized(record[name])) for name in FIELDS]


async def export_all(dsn: str, job: int, directory: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        paths = {fmt: os.path.join(directory, f"out.{fmt}") for fmt in ("jsonl", "csv", "parquet", "raw.csv")}
        rows = len(
            await conn.fetch(
                "SELECT row_no FROM requests WHERE job_id = $1 UNION ALL"
                " SELECT row_no FROM invalid_rows WHERE job_id = $1",
                job,
            )
        )
        for fmt, path in paths.items():
            raw = fmt == "raw.csv"
            assert await export_job(conn, job, fmt="csv" if raw else fmt, path=path, csv_raw=raw) == rows
        return paths
    finally:
        await conn.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ROWS)
@example(
    [("valid", '=HYPERLINK("x")', 'a,b\r\n"c"', "line\nbreak"), ("invalid", "\u2028\ufeff\x85", "tab\there", None)]
)
@example([("valid", "http://me:secret@a.test/", "https://u:p@b.test/x", None), ("invalid", "-1+1", "@x", None)])
def test_any_text_comes_back_exactly_in_every_format(session_dsn, rows: list[tuple]) -> None:
    async def crawl_free_job() -> int:
        conn = await asyncpg.connect(session_dsn)
        try:
            return await store(conn, rows)
        finally:
            await conn.close()

    job = asyncio.run(crawl_free_job())
    want = expected(rows)
    with tempfile.TemporaryDirectory() as directory:
        paths = asyncio.run(export_all(session_dsn, job, directory))
        with open(paths["jsonl"], encoding="utf-8", newline="") as f:
            assert [json.loads(line) for line in f.read().split("\n") if line] == want
        for fmt, raw in (("csv", False), ("raw.csv", True)):
            with open(paths[fmt], encoding="utf-8", newline="") as f:
                header, *records = list(csv.reader(f))
            assert header == list(FIELDS)
            assert records == [as_csv(r, raw=raw) for r in want]
        assert pq.read_table(paths["parquet"]).to_pylist() == want
