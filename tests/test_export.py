"""Exports of a real crawled job: every row once, in order, with the right types, in JSON lines,
CSV and Parquet; --only filters; Parquet's batching and its one-sentence errors."""

from __future__ import annotations

import asyncio
import csv
import json
import sys

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, test_settings
from crawler import export
from crawler.errors import EXIT_OK, UsageError
from crawler.export import export_job
from crawler.job.crawl import crawl
from crawler.ledger.chunks import Lease, LeasedChunk, chunk_requests
from crawler.ledger.jobs import job_counts
from crawler.ledger.migrate import apply_migrations
from crawler.ledger.reruns import reopen_for_retry
from crawler.ledger.results import finish_job
from crawler.ledger.summary import job_summary
from crawler.mock.server import start_mock_server

# What each row of the input is, by row number (from 1): fetched ok, failed, invalid or a duplicate.
OK_ROWS = {1, 2, 3, 5, 8, 9}  # 8 repeats row 1; 9 is a redirect chain that ends in 200
FAILED_ROWS = {4, 7}  # a 404 and a 500 (one attempt each)
INVALID_ROWS = {6, 10}
JOB = "export-job"


def _urls(base: str) -> list[str]:
    return [
        f"{base}/ok/1",
        f"{base}/ok/2",
        f"{base}/bytes/1000",
        f"{base}/status/404",
        f"{base}/ok/5",
        "ftp://example.com/file",
        f"{base}/status/500",
        f"{base}/ok/1",
        f"{base}/redirect/2",
        "not a url",
    ]


@pytest.fixture(scope="module")
def job_id(session_dsn, tmp_path_factory) -> int:
    """One crawled job for the whole module: ok, failed, invalid and duplicate rows."""
    path = tmp_path_factory.mktemp("export") / "urls.txt"

    async def make() -> int:
        runner, base = await start_mock_server()
        try:
            path.write_text("\n".join(_urls(base)) + "\n")
            code = await crawl(
                session_dsn,
                test_settings(workers=1, max_attempts=1),
                input_path=str(path),
                url_column=None,
                job_name=JOB,
                summary_json=None,
                quiet=True,
            )
            assert code == EXIT_OK
        finally:
            await runner.cleanup()
        conn = await asyncpg.connect(session_dsn)
        try:
            return await conn.fetchval("SELECT id FROM jobs WHERE name = $1", JOB)
        finally:
            await conn.close()

    return asyncio.run(make())


async def _export(dsn: str, job: int, **kwargs) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await export_job(conn, job, **kwargs)
    finally:
        await conn.close()


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_jsonl_has_every_row_in_order_with_its_types(session_dsn, job_id, tmp_path):
    out = tmp_path / "all.jsonl"
    assert await _export(session_dsn, job_id, fmt="jsonl", path=str(out)) == 10
    records = _jsonl(out)
    assert [r["row"] for r in records] == list(range(1, 11))
    assert all(list(r) == list(export.FIELDS) for r in records)
    by_row = {r["row"]: r for r in records}
    assert {n for n, r in by_row.items() if r["error_kind"] is None} == OK_ROWS
    assert {n for n, r in by_row.items() if r["error_kind"] == "invalid_url"} == INVALID_ROWS
    assert {n for n, r in by_row.items() if r["error_kind"] == "http_status"} == FAILED_ROWS
    first, sized, missing, dup, bad = by_row[1], by_row[3], by_row[4], by_row[8], by_row[6]
    assert first["status"] == 200 and first["attempts"] == 1 and first["from_cache"] is False
    assert isinstance(first["elapsed_ms"], float) and len(first["body_sha256"]) == 64
    assert sized["body_bytes"] == 1000
    assert missing["status"] == 404
    assert dup["from_cache"] is True and dup["body_sha256"] == first["body_sha256"]
    assert bad["status"] is None and bad["url"] == "ftp://example.com/file" and bad["error"]
    assert by_row[9]["final_url"].endswith("/redirect/0")


async def test_csv_round_trips_to_the_same_values_as_jsonl(session_dsn, job_id, tmp_path):
    await _export(session_dsn, job_id, fmt="jsonl", path=str(tmp_path / "all.jsonl"))
    assert await _export(session_dsn, job_id, fmt="csv", path=str(tmp_path / "all.csv")) == 10
    with (tmp_path / "all.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == export.FIELDS
        rows = list(reader)
    as_text = [{k: "" if v is None else str(v) for k, v in r.items()} for r in _jsonl(tmp_path / "all.jsonl")]
    assert rows == as_text


async def test_parquet_round_trips_to_the_same_records_as_jsonl(session_dsn, job_id, tmp_path):
    await _export(session_dsn, job_id, fmt="jsonl", path=str(tmp_path / "all.jsonl"))
    assert await _export(session_dsn, job_id, fmt="parquet", path=str(tmp_path / "all.parquet")) == 10
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.column_names == list(export.FIELDS)
    types = {f.name: f.type for f in table.schema}
    assert types["row"] == pa.int64() and types["body_bytes"] == pa.int64()
    assert types["status"] == pa.int16() and types["attempts"] == pa.int16()
    assert types["from_cache"] == pa.bool_() and pa.types.is_floating(types["elapsed_ms"])
    assert types["url"] == pa.string() and types["body_sha256"] == pa.string()
    assert table.column("status").null_count == len(INVALID_ROWS)
    assert table.to_pylist() == _jsonl(tmp_path / "all.jsonl")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("only, rows", [("ok", OK_ROWS), ("failed", FAILED_ROWS), ("invalid", INVALID_ROWS)])
async def test_only_keeps_exactly_those_rows(session_dsn, job_id, tmp_path, fmt, only, rows):
    out = tmp_path / f"only.{fmt}"
    assert await _export(session_dsn, job_id, fmt=fmt, path=str(out), only=only) == len(rows)
    if fmt == "jsonl":
        got = [r["row"] for r in _jsonl(out)]
    elif fmt == "csv":
        with out.open(newline="") as f:
            got = [int(r["row"]) for r in csv.DictReader(f)]
    else:
        got = pq.read_table(out).column("row").to_pylist()
    assert got == sorted(rows)


async def test_parquet_is_written_in_bounded_batches(session_dsn, job_id, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARQUET_BATCH_ROWS", 3)
    out = tmp_path / "batched.parquet"
    assert await _export(session_dsn, job_id, fmt="parquet", path=str(out)) == 10
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 10
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 3, 1]


async def test_an_empty_parquet_export_is_a_readable_file(session_dsn, job_id, tmp_path):
    conn = await asyncpg.connect(session_dsn)
    try:
        empty = await conn.fetchval(
            "INSERT INTO jobs (input, state, ingest_done) VALUES ('none', 'done', true) RETURNING id"
        )
    finally:
        await conn.close()
    out = tmp_path / "empty.parquet"
    assert await _export(session_dsn, empty, fmt="parquet", path=str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.column_names == list(export.FIELDS)


@pytest.mark.parametrize("path", [None, "-"])
async def test_parquet_to_stdout_is_a_usage_error(session_dsn, job_id, path):
    with pytest.raises(UsageError, match=r"^parquet cannot be written to standard output; name a file with -o PATH\.$"):
        await _export(session_dsn, job_id, fmt="parquet", path=path)


async def test_parquet_without_pyarrow_says_how_to_install_it(session_dsn, job_id, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    out = tmp_path / "nothing.parquet"
    with pytest.raises(UsageError) as caught:
        await _export(session_dsn, job_id, fmt="parquet", path=str(out))
    assert str(caught.value) == "parquet export needs pyarrow: pip install 'crawler[parquet]'."
    assert not out.exists()


def test_cli_exports_parquet_to_a_file_and_refuses_stdout(session_dsn, job_id, tmp_path):
    out = tmp_path / "cli.parquet"
    proc = run_cli("export", JOB, "--dsn", session_dsn, "--format", "parquet", "-o", str(out), "--only", "failed")
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(pq.read_table(out).column("row").to_pylist()) == sorted(FAILED_ROWS)
    proc = run_cli("export", JOB, "--dsn", session_dsn, "--format", "parquet")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "crawler: parquet cannot be written to standard output; name a file with -o PATH."
    )
    assert proc.stdout == b""


def test_each_request_gets_its_own_result_or_none_and_only_filters_them():
    requests = [{"row_no": n, "url": f"http://h/{n}", "normalized_url": f"http://h/{n}"} for n in (2, 3, 5, 8)]
    result = dict.fromkeys(
        ("status", "final_url", "error", "attempts", "from_cache", "elapsed_ms", "body_bytes", "body_sha256")
    )
    results = [{**result, "row_no": 8, "error_kind": "timeout"}, {**result, "row_no": 3, "error_kind": None}]
    records = export.valid_outcomes(requests, results)
    assert [(r["row"], r["url"], r["error_kind"]) for r in records] == [
        (2, "http://h/2", None),
        (3, "http://h/3", None),
        (5, "http://h/5", None),
        (8, "http://h/8", "timeout"),
    ]
    assert all(list(r) == list(export.FIELDS) for r in records)
    assert [r["row"] for r in export.valid_outcomes(requests, results, "ok")] == [3]  # 2 and 5: not fetched
    assert [r["row"] for r in export.valid_outcomes(requests, results, "failed")] == [8]


async def _synthetic_job(
    conn, rows: int, *, invalid_every: int = 50, duplicate_every: int = 10, chunk_rows: int = 1000
) -> int:
    """A job as a big crawl leaves it just before it finishes, written straight into the tables:
    every chunk done, one row in `invalid_every` invalid, one in `duplicate_every` of the others
    repeating the row before it (no result yet: finishing the job gives it one), one fetched row
    in 7 failed with a 500."""
    job = await conn.fetchval(
        "INSERT INTO jobs (input, state, ingest_done, rows_read) VALUES ('synthetic', 'running', true, $1)"
        " RETURNING id",
        rows,
    )
    await conn.execute(
        "INSERT INTO requests (job_id, row_no, chunk_no, method, url, fingerprint, dup_of)"
        " SELECT $1, g, (g - 1) / $5, 'GET', 'http://127.0.0.1/ok/' || u, decode(md5(u::text), 'hex'),"
        "        CASE WHEN g % $4 = 0 THEN g - 1 END"
        " FROM generate_series(1, $2::bigint) g, LATERAL (SELECT CASE WHEN g % $4 = 0 THEN g - 1 ELSE g END) AS x(u)"
        " WHERE g % $3 <> 0",
        job,
        rows,
        invalid_every,
        duplicate_every,
        chunk_rows,
    )
    await conn.execute(
        "INSERT INTO invalid_rows (job_id, row_no, raw, reason) SELECT $1, g, 'bad ' || g, 'not a URL'"
        " FROM generate_series($3::bigint, $2::bigint, $3::bigint) g",
        job,
        rows,
        invalid_every,
    )
    await conn.execute(
        "INSERT INTO results (job_id, row_no, status, final_url, error_kind, attempts, elapsed_ms, body_bytes,"
        "                     body_sha256)"
        " SELECT job_id, row_no, CASE WHEN row_no % 7 = 0 THEN 500 ELSE 200 END, url,"
        "        CASE WHEN row_no % 7 = 0 THEN 'http_status' END, 1, row_no % 100, 3, sha256(url::bytea)"
        " FROM requests WHERE job_id = $1 AND dup_of IS NULL",
        job,
    )
    await conn.execute(
        "INSERT INTO chunks (job_id, chunk_no, first_row, last_row, fetch_rows, done_rows, input_rows,"
        "                    invalid_rows, state)"
        " SELECT $1, (g - 1) / $5, min(g), max(g), count(*) FILTER (WHERE g % $3 <> 0 AND g % $4 <> 0),"
        "        count(*) FILTER (WHERE g % $3 <> 0 AND g % $4 <> 0), count(*), count(*) FILTER (WHERE g % $3 = 0),"
        "        'done'"
        " FROM generate_series(1, $2::bigint) g GROUP BY (g - 1) / $5",
        job,
        rows,
        invalid_every,
        duplicate_every,
        chunk_rows,
    )
    return job


class ExplainedConnection:
    """A connection that first runs each statement under EXPLAIN (ANALYZE, BUFFERS), in a
    savepoint it rolls back, and adds up the buffers the plans touched: the work PostgreSQL did,
    whatever the plan and however busy the machine."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.buffers = 0

    def __getattr__(self, name: str):
        return getattr(self._conn, name)  # transactions, copies: as they are

    async def _explain(self, query: str, args: tuple) -> None:
        if not query.lstrip().upper().startswith(("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")):
            return
        savepoint = self._conn.transaction()
        await savepoint.start()
        try:
            plan = await self._conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
        finally:
            await savepoint.rollback()
        top = json.loads(plan)[0]["Plan"]  # a node's buffers include its children's and subplans'
        self.buffers += top["Shared Hit Blocks"] + top["Shared Read Blocks"]

    async def fetch(self, query: str, *args, **kwargs):
        await self._explain(query, args)
        return await self._conn.fetch(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args, **kwargs):
        await self._explain(query, args)
        return await self._conn.fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args, **kwargs):
        await self._explain(query, args)
        return await self._conn.fetchval(query, *args, **kwargs)

    async def execute(self, query: str, *args, **kwargs):
        await self._explain(query, args)
        return await self._conn.execute(query, *args, **kwargs)


async def _buffers(conn: asyncpg.Connection, job: int, tmp_path) -> tuple[dict[str, int], dict]:
    """The buffers each operation on the job touched: finishing it, the pending rows of all its
    chunks (as a second lease asks them), exporting it whole and its failures, its summary and
    its counts, then reopening its 5xx rows for `crawler retry`; and the summary."""
    explained = ExplainedConnection(conn)
    chunks = await conn.fetch("SELECT chunk_no, first_row, last_row FROM chunks WHERE job_id = $1", job)

    async def pending_rows(c) -> None:
        for chunk in chunks:
            await chunk_requests(
                c, job, LeasedChunk(Lease(chunk["chunk_no"], 2), chunk["first_row"], chunk["last_row"])
            )

    operations = {
        "finish": lambda c: finish_job(c, job),
        "pending rows": pending_rows,
        "export": lambda c: export_job(c, job, fmt="jsonl", path=str(tmp_path / f"{job}.jsonl")),
        "export failed": lambda c: export_job(c, job, fmt="csv", path=str(tmp_path / f"{job}.csv"), only="failed"),
        "summary": lambda c: job_summary(c, job),
        "counts": lambda c: job_counts(c, job),
        "retry": lambda c: reopen_for_retry(c, job, kinds=[], statuses=[(500, 599)]),
    }
    buffers, outputs = {}, {}
    for name, operation in operations.items():
        explained.buffers = 0
        outputs[name] = await asyncio.wait_for(operation(explained), 120)
        buffers[name] = explained.buffers
    return buffers, outputs["summary"]


async def test_a_job_newer_than_the_table_statistics_costs_time_linear_in_its_size(fresh_dsn, tmp_path):
    """Finished, exported, summarized and retried right after its crawl, before autovacuum has
    analysed its rows, a job looks like one row to the planner; PostgreSQL 15 then nested loops
    over the whole job for each of its rows (quadratic). Twice the rows must cost under three
    times the work, on every PostgreSQL."""
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await apply_migrations(conn)
        for table in ("requests", "results", "invalid_rows", "chunks"):
            # Statistics only when the test says so: both jobs below stay newer than them.
            await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        first = await _synthetic_job(conn, 2_000)
        assert await finish_job(conn, first)
        await conn.execute("ANALYZE")
        smaller = await _synthetic_job(conn, 25_000)
        small, _ = await _buffers(conn, smaller, tmp_path)
        larger = await _synthetic_job(conn, 50_000)
        large, summary = await _buffers(conn, larger, tmp_path)
        reopened = await conn.fetchval("SELECT count(*) FROM results WHERE job_id = $1 AND status = 500", larger)
    finally:
        await conn.close()
    for name in small:
        assert 0 < large[name] < 3 * small[name], (name, small, large)
        # And a few pages per row at most, as walks by primary key read: a statement that rescans
        # a bounded range for every row is linear in the job too, with a range-sized factor.
        assert large[name] < 2 * 50_000, (name, large)
    records = _jsonl(tmp_path / f"{larger}.jsonl")
    assert [r["row"] for r in records] == list(range(1, 50_001))
    assert all((r["error_kind"] == "invalid_url") == (r["row"] % 50 == 0) for r in records)
    duplicates = [r for r in records if r["row"] % 10 == 0 and r["row"] % 50 != 0]
    assert duplicates and all(
        r["from_cache"] and r["status"] == (500 if (r["row"] - 1) % 7 == 0 else 200) for r in duplicates
    )
    with open(tmp_path / f"{larger}.csv", newline="") as f:
        failed = [int(r["row"]) for r in csv.DictReader(f)]
    assert failed == [r["row"] for r in records if r["status"] == 500]
    assert summary["state"] == "done" and summary["rows"] == 50_000 and summary["invalid"] == 1_000
    assert summary["errors"]["http_status"] == {"count": len(failed), "example": "http://127.0.0.1/ok/7"}
    assert summary["cache"]["duplicate"] == len(duplicates)
    assert reopened == 0  # every 5xx row, duplicates included, waits to be fetched again


# --- hostile cells: commas, quotes, newlines, formulas, passwords --------------------------------

HOSTILE = "hostile-export"


def _hostile_rows(base: str) -> list[str]:
    return [
        f'{base}/ok/1?a=1,2&q="x"',  # 1: a comma and quotes
        f"{base}/ok/2?x=a b\nc",  # 2: a newline (a browser drops it from what is sent)
        '=HYPERLINK("http://evil.example/","x")',  # 3..6: formulas, invalid rows
        "+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(1+1)",
        f"http://alice:s3cret@{base.removeprefix('http://')}/ok/7",  # 7: a password
        'http://exa,mple".com/',  # 8: an invalid host with a comma and a quote in the reason
        f"http://bob:s3cret@{base.removeprefix('http://')}/status/404",  # 9: a failure with a password
        "\t=1+1",  # 10: a tab first
    ]


@pytest.fixture(scope="module")
def hostile_job(session_dsn, tmp_path_factory) -> tuple[int, list[str]]:
    path = tmp_path_factory.mktemp("hostile") / "urls.csv"

    async def make() -> tuple[int, list[str]]:
        runner, base = await start_mock_server()
        try:
            rows = _hostile_rows(base)
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["url"])
                writer.writerows([row] for row in rows)
            code = await crawl(
                session_dsn,
                test_settings(workers=1, max_attempts=1),
                input_path=str(path),
                url_column="url",
                job_name=HOSTILE,
                summary_json=None,
                quiet=True,
            )
            assert code == EXIT_OK
        finally:
            await runner.cleanup()
        conn = await asyncpg.connect(session_dsn)
        try:
            return await conn.fetchval("SELECT id FROM jobs WHERE name = $1", HOSTILE), rows
        finally:
            await conn.close()

    return asyncio.run(make())


async def test_the_export_shows_the_rows_url_as_written_and_its_normalized_form(session_dsn, hostile_job, tmp_path):
    job, rows = hostile_job
    out = tmp_path / "hostile.jsonl"
    await _export(session_dsn, job, fmt="jsonl", path=str(out))
    records = {r["row"]: r for r in _jsonl(out)}
    assert records[1]["url"] == rows[0]
    assert records[1]["normalized_url"] == rows[0].replace('"', "%22")  # what is sent, and what identifies it
    assert records[2]["url"] == rows[1] and records[2]["normalized_url"].endswith("/ok/2?x=a%20bc")
    assert records[3]["url"] == rows[2] and records[3]["normalized_url"] is None
    assert records[8]["error"] == "invalid host 'exa,mple\".com'"
    assert records[7]["url"] == rows[6].replace("s3cret", "***")
    assert records[7]["normalized_url"] == records[7]["url"] and records[7]["final_url"] == records[7]["url"]
    assert records[9]["status"] == 404 and records[9]["url"] == rows[8].replace("s3cret", "***")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
async def test_no_export_holds_a_urls_password(session_dsn, hostile_job, tmp_path, fmt):
    job, _ = hostile_job
    out = tmp_path / f"hostile.{fmt}"
    await _export(session_dsn, job, fmt=fmt, path=str(out))
    data = out.read_bytes() if fmt != "parquet" else str(pq.read_table(out).to_pylist()).encode()
    assert b"s3cret" not in data and b"alice:***@" in data and b"bob:***@" in data


async def test_csv_neutralizes_formula_cells_and_round_trips_everything_else(session_dsn, hostile_job, tmp_path):
    job, rows = hostile_job
    await _export(session_dsn, job, fmt="jsonl", path=str(tmp_path / "h.jsonl"))
    await _export(session_dsn, job, fmt="csv", path=str(tmp_path / "h.csv"))
    with (tmp_path / "h.csv").open(newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    expected = []
    for record in _jsonl(tmp_path / "h.jsonl"):
        cells = {}
        for key, value in record.items():
            text = "" if value is None else str(value)
            cells[key] = "'" + text if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
        expected.append(cells)
    assert got == expected
    by_row = {int(r["row"]): r for r in got}
    assert [by_row[n]["url"] for n in (3, 4, 5, 6, 10)] == ["'" + rows[n - 1] for n in (3, 4, 5, 6, 10)]
    assert by_row[1]["url"] == rows[0] and by_row[2]["url"] == rows[1]  # quotes, comma, newline intact


async def test_csv_raw_writes_every_cell_as_stored(session_dsn, hostile_job, tmp_path):
    job, rows = hostile_job
    await _export(session_dsn, job, fmt="jsonl", path=str(tmp_path / "h.jsonl"))
    await _export(session_dsn, job, fmt="csv", path=str(tmp_path / "raw.csv"), csv_raw=True)
    with (tmp_path / "raw.csv").open(newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert got == [{k: "" if v is None else str(v) for k, v in r.items()} for r in _jsonl(tmp_path / "h.jsonl")]
    assert [r["url"] for r in got[2:6]] == rows[2:6]


async def test_parquet_round_trips_hostile_cells(session_dsn, hostile_job, tmp_path):
    job, _ = hostile_job
    await _export(session_dsn, job, fmt="jsonl", path=str(tmp_path / "h.jsonl"))
    await _export(session_dsn, job, fmt="parquet", path=str(tmp_path / "h.parquet"))
    assert pq.read_table(tmp_path / "h.parquet").to_pylist() == _jsonl(tmp_path / "h.jsonl")


def test_cli_csv_raw_turns_the_guard_off(session_dsn, hostile_job):
    guarded = run_cli("export", HOSTILE, "--dsn", session_dsn, "--format", "csv", "--only", "invalid")
    raw = run_cli("export", HOSTILE, "--dsn", session_dsn, "--format", "csv", "--only", "invalid", "--csv-raw")
    assert guarded.returncode == raw.returncode == 0, guarded.stderr + raw.stderr
    assert b"\n3,\"'=HYPERLINK(" in guarded.stdout.replace(b"\r\n", b"\n")
    assert b'\n3,"=HYPERLINK(' in raw.stdout.replace(b"\r\n", b"\n")


async def test_status_and_the_summary_mask_a_urls_password(session_dsn, hostile_job):
    from crawler.ledger.summary import job_summary

    job, _ = hostile_job
    conn = await asyncpg.connect(session_dsn)
    try:
        summary = await job_summary(conn, job)
    finally:
        await conn.close()
    example = summary["errors"]["http_status"]["example"]
    assert "bob:***@" in example and "s3cret" not in example
    proc = run_cli("status", HOSTILE, "--dsn", session_dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert b"bob:***@" in proc.stdout and b"s3cret" not in proc.stdout
    proc = run_cli("status", HOSTILE, "--dsn", session_dsn)
    assert proc.returncode == 0 and b"s3cret" not in proc.stdout + proc.stderr
