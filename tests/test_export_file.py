"""`crawler export -o PATH` where PATH cannot take the export: a directory, a missing directory,
a full device, a place no one may write. One sentence, exit 1, no traceback, no partial file;
and a good PATH is replaced only once the export is complete."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from conftest import run_cli
from crawler.errors import OutputError
from crawler.export import export_job
from crawler.export_file import ExportFile
from crawler.job.inputs import parse_request
from crawler.ledger.chunks import store_chunk
from crawler.ledger.jobs import create_job, find_job

ROWS = 2500  # more than one write of a thousand lines: a failure can come in the middle


@pytest.fixture(scope="module")
def job(session_dsn) -> str:
    """A stored job (not crawled: its rows export without results) to export."""
    name = f"export-file-{os.getpid()}"

    async def make() -> None:
        conn = await asyncpg.connect(session_dsn)
        try:
            created = await create_job(conn, name=name, input="urls.txt", settings={})
            rows = [parse_request(i, f"http://127.0.0.1:1/page/{i}") for i in range(1, ROWS + 1)]
            await store_chunk(conn, created.id, 0, rows)
        finally:
            await conn.close()

    asyncio.run(make())
    return name


def _one_sentence_exit_1(proc, *fragments: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("crawler: ") and err.rstrip().endswith("."), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".part")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_directory_is_refused_in_one_sentence(session_dsn, job, tmp_path, fmt):
    proc = run_cli("export", job, "--format", fmt, "-o", str(tmp_path), "--dsn", session_dsn)
    _one_sentence_exit_1(proc, "is a directory")
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_is_refused_before_anything_is_written(session_dsn, job, tmp_path):
    target = tmp_path / "no" / "such" / "out.jsonl"
    proc = run_cli("export", job, "-o", str(target), "--dsn", session_dsn)
    _one_sentence_exit_1(proc, "does not exist")
    assert os.listdir(tmp_path) == []


def test_a_read_only_place_is_refused(session_dsn, job):
    # /proc takes no new files, for root too (chmod would not stop root, and CI runs as root).
    proc = run_cli("export", job, "-o", "/proc/crawler-export.jsonl", "--dsn", session_dsn)
    _one_sentence_exit_1(proc, "/proc/crawler-export.jsonl")
    assert not os.path.exists("/proc/crawler-export.jsonl")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_full_device_is_one_sentence(session_dsn, job, fmt):
    proc = run_cli("export", job, "--format", fmt, "-o", "/dev/full", "--dsn", session_dsn)
    _one_sentence_exit_1(proc, "No space left on device")
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")  # the device is left as it was


def test_standard_output_on_a_full_device_is_one_sentence(session_dsn, job):
    with open("/dev/full", "wb") as full:
        import subprocess
        import sys

        from conftest import ROOT

        proc = subprocess.run(
            [sys.executable, "-m", "crawler", "export", job, "--dsn", session_dsn],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=ROOT,
        )
    _one_sentence_exit_1(proc, "standard output", "No space left on device")


async def test_a_failure_midway_leaves_the_old_file_and_no_partial_one(session_dsn, job, tmp_path):
    """The export is written beside its name and renamed over it at the end: a failure in the
    middle (the database gone, here) keeps the file that was there and leaves no part behind."""
    target = tmp_path / "out.jsonl"
    target.write_text("the previous export\n")
    conn = await asyncpg.connect(session_dsn)
    job_id = (await find_job(conn, job)).id
    written = 0
    original = ExportFile.errors

    def failing_errors(self):
        nonlocal written
        written += 1
        if written == 3:  # the open, the first thousand lines, then the connection goes
            conn.terminate()
        return original(self)

    ExportFile.errors = failing_errors
    try:
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)):
            await export_job(conn, job_id, fmt="jsonl", path=str(target))
    finally:
        ExportFile.errors = original
    assert written >= 3
    assert target.read_text() == "the previous export\n"
    assert _leftovers(tmp_path) == []


async def test_a_complete_export_replaces_the_file_and_keeps_its_mode(session_dsn, job, tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    conn = await asyncpg.connect(session_dsn)
    try:
        count = await export_job(conn, (await find_job(conn, job)).id, fmt="csv", path=str(target))
    finally:
        await conn.close()
    assert count == ROWS
    assert len(target.read_text().splitlines()) == ROWS + 1  # and the header
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert _leftovers(tmp_path) == []


def test_export_file_checks_run_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        ExportFile(str(tmp_path))
    with pytest.raises(OutputError, match="does not exist"):
        ExportFile(str(tmp_path / "missing" / "x"))
    out = ExportFile(str(tmp_path / "x.jsonl"))
    assert _leftovers(tmp_path)  # made at once, so a place that takes no file fails fast
    out.discard()
    assert os.listdir(tmp_path) == []
