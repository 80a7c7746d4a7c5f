"""What a person sees while a job runs: the live display on a real terminal (a pseudo-terminal),
plain `progress:` lines in a pipe, nothing with --quiet; the estimates behind them; the summary."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from conftest import ROOT, run_cli
from crawler.job.progress import (
    ProgressView,
    Snapshot,
    WorkerActivity,
    estimate_total,
    live_display,
    plain_line,
    render_summary,
)
from crawler.ledger.jobs import JobCounts

pytestmark = pytest.mark.one_server

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PLAIN = re.compile(
    r"^progress: rows [\d,]+/(~?[\d,]+ \([\d.]+%\)|\?), [\d,]+ req/s, ok [\d,]+, failed [\d,]+, cached [\d,]+,"
    r" invalid [\d,]+, workers \d+, elapsed \S+, eta \S+$"
)


def counts(**values) -> JobCounts:
    base = dict(
        rows_read=0,
        state="running",
        to_fetch=0,
        fetched=0,
        ok=0,
        failed=0,
        invalid=0,
        duplicates=0,
        pending=0,
        leased=0,
        done=0,
        ingest_done=True,
    )
    base.update(values)
    return JobCounts(**base)


# --- estimates --------------------------------------------------------------------------------


def test_total_is_exact_once_ingest_is_done():
    assert estimate_total(counts(rows_read=1234, ingest_done=True, bytes_read=10, bytes_total=100)) == (1234, False)


def test_total_is_extrapolated_from_the_bytes_read_while_ingesting():
    # a quarter of the (compressed) bytes gave 1000 rows: about 4000 in all
    assert estimate_total(counts(rows_read=1000, ingest_done=False, bytes_read=2500, bytes_total=10000)) == (4000, True)
    # never below what has been read already
    assert estimate_total(counts(rows_read=1000, ingest_done=False, bytes_read=10000, bytes_total=9000)) == (1000, True)


def test_total_is_unknown_for_stdin_or_before_the_first_bytes():
    assert estimate_total(counts(rows_read=50, ingest_done=False, bytes_read=100, bytes_total=None)) == (None, True)
    assert estimate_total(counts(rows_read=0, ingest_done=False, bytes_read=0, bytes_total=500)) == (None, True)


def test_rate_covers_the_last_ten_seconds_and_gives_the_eta():
    view = ProgressView(interval=5.0, stream=io.StringIO())
    c = counts(rows_read=10_000, to_fetch=10_000)
    for t, fetched in [(0, 0), (5, 500), (10, 1000), (20, 1500)]:
        snap = view.snapshot(dataclasses.replace(c, fetched=fetched), [], now=view._started + t)
    assert snap.rate == pytest.approx(50.0)  # 500 requests between t=10 and t=20, not 1500 over 20 s
    assert snap.eta == pytest.approx((10_000 - 1500) / 50.0)
    assert snap.done == 1500


def test_rows_done_count_fetched_cached_and_invalid_rows_and_the_eta_scales_while_ingesting():
    view = ProgressView(interval=5.0, stream=io.StringIO())
    c = counts(
        rows_read=1000,
        to_fetch=800,
        fetched=0,
        invalid=50,
        duplicates=150,
        ingest_done=False,
        bytes_read=1000,
        bytes_total=4000,
    )
    view.snapshot(c, [], now=view._started)
    snap = view.snapshot(dataclasses.replace(c, fetched=400), [], now=view._started + 4)
    assert (snap.total, snap.estimated) == (4000, True)
    assert snap.done == 400 + 50 + 150
    assert snap.to_fetch == 3200
    assert snap.rate == pytest.approx(100.0) and snap.eta == pytest.approx((3200 - 400) / 100.0)


def test_worker_rates_come_from_their_recent_heartbeats():
    view = ProgressView(interval=5.0, stream=io.StringIO())
    start = datetime(2024, 1, 1, tzinfo=UTC)
    worker = dict(worker_id="box:1", host="box", pid=1, fetched=0, rate=0, started_at=start, heartbeat_at=start)
    view.snapshot(counts(), [worker])
    later = dict(worker, fetched=1000, rate=999.0, heartbeat_at=start + timedelta(seconds=5))
    (activity,) = view.snapshot(counts(), [later]).workers
    assert (activity.host, activity.pid, activity.fetched, activity.rate) == ("box", 1, 1000, 200.0)


# --- the two displays -------------------------------------------------------------------------


def _snap(**values) -> Snapshot:
    base = dict(
        done=150,
        total=1000,
        estimated=True,
        fetched=120,
        to_fetch=900,
        rate=42.0,
        ok=110,
        failed=10,
        cached=20,
        invalid=10,
        elapsed=75.0,
        eta=18.5,
        chunks=(1, 2, 7),
        workers=[],
    )
    base.update(values)
    return Snapshot(**base)


def test_plain_line_is_one_greppable_line():
    line = plain_line(_snap())
    assert line == (
        "progress: rows 150/~1,000 (15.0%), 42 req/s, ok 110, failed 10, cached 20, invalid 10,"
        " workers 0, elapsed 1m15s, eta 18s"
    )
    assert PLAIN.match(line)
    assert PLAIN.match(plain_line(_snap(total=None, eta=None)))
    assert "rows 150/1,000 (15.0%)" in plain_line(_snap(estimated=False))


def test_live_display_shows_rows_rate_outcomes_eta_and_each_worker():
    console = Console(record=True, width=110, file=io.StringIO())
    workers = [WorkerActivity("box-a", 11, 60, 21.0), WorkerActivity("box-b", 12, 60, 21.0)]
    console.print(live_display(_snap(workers=workers)))
    text = console.export_text()
    assert "150 / ~1,000  15.0% (estimated while reading the input)" in text
    assert "42/s (last 10 s)" in text
    assert re.search(r"ok 110\s+failed 10\s+cached 20\s+invalid 10", text)
    assert "eta 18s" in text and "1 done, 2 leased, 7 pending" in text
    assert re.search(r"box-a\s+11\s+60\s+21/s", text) and "box-b" in text


def test_not_a_terminal_prints_a_line_per_interval_and_the_last_state_at_the_end():
    out = io.StringIO()
    with ProgressView(interval=3600, stream=out) as view:
        assert not view.interactive
        view.update(counts(rows_read=10, to_fetch=10, fetched=1), [])
        view.update(counts(rows_read=10, to_fetch=10, fetched=5), [])  # within the interval: held back
        view.update(counts(rows_read=10, to_fetch=10, fetched=10, done=1), [])
        assert out.getvalue().count("progress:") == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(PLAIN.match(line) for line in lines)
    assert lines[-1].startswith("progress: rows 10/10 (100.0%)")


def test_quiet_prints_nothing():
    out = io.StringIO()
    with ProgressView(quiet=True, interval=0, stream=out) as view:
        view.update(counts(rows_read=10, to_fetch=10, fetched=3), [])
    assert out.getvalue() == ""


def test_summary_shows_totals_histogram_errors_latency_and_throughput():
    summary = {
        "job_id": 7,
        "job_name": "weekly",
        "state": "done",
        "rows": 100,
        "requests": 98,
        "fetched": 90,
        "from_cache": 8,
        "invalid": 2,
        "ok": 80,
        "failed": 18,
        "retries": 5,
        "elapsed_s": 125.0,
        "requests_per_s": 0.7,
        "time_to_first_fetch_s": 0.4,
        "latency_ms": {"p50": 12.0, "p95": 80.5, "p99": 140.25},
        "statuses": {"200": 80, "404": 12, "503": 3},
        "errors": {
            "http_status": {"count": 15, "example": "http://127.0.0.1/status/404"},
            "timeout": {"count": 3, "example": "http://127.0.0.1/delay/9000/x"},
        },
    }
    console = Console(record=True, width=100, file=io.StringIO())
    render_summary(summary, console)
    text = console.export_text()
    assert "job 7 (weekly): done" in text
    for label, value in [
        ("rows", "100"),
        ("fetched", "90"),
        ("cached", "8"),
        ("invalid", "2"),
        ("ok", "80"),
        ("failed", "18"),
        ("retries", "5"),
        ("throughput", "1"),
    ]:
        assert re.search(rf"{label}\s+{value}\b", text), label
    assert "125.0" in text and "2m05s" in text  # elapsed
    assert "12.0 / 80.5 / 140.2" in text and "p50 / p95 / p99" in text
    assert re.search(r"200\s+80\s+84\.2%\s+█+", text) and re.search(r"503\s+3\s+3\.2%\s+█", text)
    assert re.search(r"http_status\s+15\s+http://127\.0\.0\.1/status/404", text)
    assert re.search(r"timeout\s+3\s+http://127\.0\.0\.1/delay/9000/x", text)


# --- real crawls --------------------------------------------------------------------------------


def _urls(tmp_path, base: str, n: int, delay_ms: int) -> str:
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{base}/delay/{delay_ms}/{i}\n" for i in range(n)) + "not a url\n")
    return str(path)


def _crawl_in_a_terminal(args: list[str], timeout: float = 90) -> tuple[int, str]:
    """Run `crawler ARGS` with a pseudo-terminal as its stdin, stdout and stderr; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TERM")}
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        code = proc.wait(10)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_the_live_display(session_dsn, mock_process, tmp_path):
    path = _urls(tmp_path, mock_process, 600, 50)
    code, out = _crawl_in_a_terminal(
        [
            "crawl",
            path,
            "--dsn",
            session_dsn,
            "--allow-net",
            "127.0.0.1/32",
            "--workers",
            "2",
            "--concurrency",
            "10",
            "--chunk-size",
            "50",
        ]
    )
    assert code == 0, f"exit code {code}; the terminal's last lines:\n{ANSI.sub('', out)[-3000:]}"
    assert "\x1b[1A" in out and "\x1b[2K" in out  # redrawn in place, not scrolled
    text = ANSI.sub("", out)
    assert "progress:" not in text
    assert re.search(r"requests\s+[\d,]+ / [\d,]+ fetched,\s+[\d,]+/s \(last 10 s\)", text)
    assert re.search(r"outcomes\s+ok [\d,]+\s+failed \d+\s+cached \d+\s+invalid \d+", text)
    assert re.search(r"worker\s+pid\s+fetched\s+rate", text)  # per-worker activity at some point
    assert "601 / 601  100.0%" in text  # the last frame stays on screen
    assert "status codes" in text and "export with: crawler export" in text


def test_a_pipe_gets_plain_progress_lines(session_dsn, mock_process, tmp_path):
    path = _urls(tmp_path, mock_process, 300, 20)
    proc = run_cli(
        "crawl",
        path,
        "--dsn",
        session_dsn,
        "--allow-net",
        "127.0.0.1/32",
        "--workers",
        "2",
        "--concurrency",
        "10",
        "--chunk-size",
        "50",
        env={"CRAWLER_PROGRESS_INTERVAL": "0.2"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    err, out = proc.stderr.decode(), proc.stdout.decode()
    lines = [line for line in err.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 2, err
    assert all(PLAIN.match(line) for line in lines), lines
    assert lines[-1].startswith("progress: rows 301/301 (100.0%)")
    assert "\x1b[" not in err + out  # no terminal control codes in a log
    assert "status codes" in out and "latency" in out


def test_quiet_crawl_prints_no_progress_and_no_summary(session_dsn, mock_process, tmp_path):
    path = _urls(tmp_path, mock_process, 50, 0)
    proc = run_cli(
        "crawl",
        path,
        "--dsn",
        session_dsn,
        "--allow-net",
        "127.0.0.1/32",
        "--workers",
        "1",
        "--quiet",
        env={"CRAWLER_PROGRESS_INTERVAL": "0.05"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and b"progress:" not in proc.stderr
