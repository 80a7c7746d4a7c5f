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

from crawler import export
from crawler.cli import build_parser
from crawler.crawl import crawl
from crawler.errors import EXIT_OK, UsageError
from crawler.export import export_job
from crawler.mock_server import start_mock_server

from conftest import run_cli, test_settings

# What each row of the input is, by row number (from 1): fetched ok, failed, invalid or a duplicate.
OK_ROWS = {1, 2, 3, 5, 8, 9}  # 8 repeats row 1; 9 is a redirect chain that ends in 200
FAILED_ROWS = {4, 7}  # a 404 and a 500 (one attempt each)
INVALID_ROWS = {6, 10}
JOB = "export-job"


def _urls(base: str) -> list[str]:
    return [
        f"{base}/ok/1", f"{base}/ok/2", f"{base}/bytes/1000", f"{base}/status/404", f"{base}/ok/5",
        "ftp://example.com/file", f"{base}/status/500", f"{base}/ok/1", f"{base}/redirect/2", "not a url",
    ]


@pytest.fixture(scope="module")
def job_id(session_dsn, tmp_path_factory) -> int:
    """One crawled job for the whole module: ok, failed, invalid and duplicate rows."""
    path = tmp_path_factory.mktemp("export") / "urls.txt"

    async def make() -> int:
        runner, base = await start_mock_server()
        try:
            path.write_text("\n".join(_urls(base)) + "\n")
            code = await crawl(session_dsn, test_settings(workers=1, max_attempts=1), input_path=str(path),
                               url_column=None, job_name=JOB, summary_json=None, quiet=True)
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
        empty = await conn.fetchval("INSERT INTO jobs (input, state, ingest_done) VALUES ('none', 'done', true) RETURNING id")
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


def _format_choices_have_parquet() -> bool:
    try:
        build_parser().parse_args(["export", "1", "--format", "parquet"])
    except UsageError:
        return False
    return True


@pytest.mark.skipif(not _format_choices_have_parquet(), reason="crawler/cli.py's export --format lacks parquet")
def test_cli_exports_parquet_to_a_file_and_refuses_stdout(session_dsn, job_id, tmp_path):
    out = tmp_path / "cli.parquet"
    proc = run_cli("export", JOB, "--dsn", session_dsn, "--format", "parquet", "-o", str(out), "--only", "failed")
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(pq.read_table(out).column("row").to_pylist()) == sorted(FAILED_ROWS)
    proc = run_cli("export", JOB, "--dsn", session_dsn, "--format", "parquet")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "crawler: parquet cannot be written to standard output; name a file with -o PATH.")
    assert proc.stdout == b""


async def _synthetic_job(conn, rows: int, invalid_every: int) -> int:
    """A finished job written straight into the tables (as a big crawl leaves them): one valid
    row in `invalid_every` is instead invalid."""
    job = await conn.fetchval("INSERT INTO jobs (input, state, ingest_done) VALUES ('synthetic', 'done', true) RETURNING id")
    await conn.execute(
        "INSERT INTO requests (job_id, row_no, chunk_no, method, url, fingerprint)"
        " SELECT $1, g, 0, 'GET', 'http://127.0.0.1/ok/' || g, decode(md5(g::text), 'hex')"
        " FROM generate_series(1, $2::bigint) g WHERE g % $3 <> 0", job, rows, invalid_every)
    await conn.execute(
        "INSERT INTO invalid_rows (job_id, row_no, raw, reason) SELECT $1, g, 'bad ' || g, 'not a URL'"
        " FROM generate_series($3::bigint, $2::bigint, $3::bigint) g", job, rows, invalid_every)
    await conn.execute(
        "INSERT INTO results (job_id, row_no, status, final_url, attempts, elapsed_ms, body_bytes, body_sha256)"
        " SELECT job_id, row_no, CASE WHEN row_no % 7 = 0 THEN 500 ELSE 200 END, url, 1, 1.5, 3, sha256(url::bytea)"
        " FROM requests WHERE job_id = $1", job)
    await conn.execute("UPDATE results SET error_kind = 'http_status' WHERE job_id = $1 AND status = 500", job)
    return job


async def test_a_job_newer_than_the_table_statistics_streams_in_row_order(session_dsn, tmp_path):
    """Exported right after its crawl, before autovacuum has analysed its rows: the planner
    then believes the job has one row; the export must still merge, not nest loops."""
    conn = await asyncpg.connect(session_dsn)
    try:
        job = await _synthetic_job(conn, 20_000, 50)
        async with conn.transaction(readonly=True):
            for setting in export._STREAMING_PLAN:
                await conn.execute(setting)
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + export._VALID.format(only=""), job))
        assert "Merge" in plan and "requests_pkey" in plan and "results_pkey" in plan, plan
        assert "Nested Loop" not in plan and "Hash" not in plan and "Sort" not in plan, plan
        out = tmp_path / "synthetic.jsonl"
        count = await asyncio.wait_for(export_job(conn, job, fmt="jsonl", path=str(out)), 60)
        failed = await asyncio.wait_for(export_job(conn, job, fmt="jsonl", path=str(tmp_path / "f.jsonl"),
                                                   only="failed"), 60)
    finally:
        await conn.close()
    records = _jsonl(out)
    assert count == 20_000 and [r["row"] for r in records] == list(range(1, 20_001))
    assert all((r["error_kind"] == "invalid_url") == (r["row"] % 50 == 0) for r in records)
    assert failed == sum(1 for n in range(1, 20_001) if n % 7 == 0 and n % 50 != 0)
