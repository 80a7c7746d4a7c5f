"""Prometheus metrics: real worker processes count into the exporter's directory, and its HTTP
endpoint serves their sum with the parent's own counts while it is open."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import asyncpg
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, test_settings
from crawler import metrics
from crawler.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from crawler.fetch.process import run_worker
from crawler.job.crawl import crawl
from crawler.job.inputs import RequestRow
from crawler.ledger.chunks import mark_ingested, store_chunk
from crawler.ledger.jobs import create_job, job_counts, set_job_state
from crawler.metrics import MULTIPROC_DIR, Exporter
from crawler.urls import fingerprint

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture
def exporter():
    with Exporter("127.0.0.1", 0) as exporter:  # any free port
        yield exporter


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def run_crawl(dsn: str, lines: list[str], tmp_path, name: str, **overrides) -> None:
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    code = await crawl(
        dsn,
        test_settings(**overrides),
        input_path=str(path),
        url_column=None,
        job_name=name,
        summary_json=None,
        quiet=True,
    )
    assert code == EXIT_OK


async def test_metrics_after_a_small_crawl_count_every_attempt_and_result(
    session_dsn, db, mock_url, tmp_path, exporter
):
    lines = [
        f"{mock_url}/ok/m/1",
        f"{mock_url}/ok/m/2",
        f"{mock_url}/ok/m/3",
        f"{mock_url}/ok/m/1",
        f"{mock_url}/status/404",
        f"{mock_url}/flaky/2/m",
    ]  # a duplicate; 503, 503, then 200
    await run_crawl(session_dsn, lines, tmp_path, "metrics-small", workers=2, chunk_size=2, max_attempts=3)
    jid = await db.fetchval("SELECT id FROM jobs WHERE name = 'metrics-small'")
    exporter.observe_job(await job_counts(db, jid))  # what the supervisor does on every poll

    s = await scrape(exporter.port)
    assert value(s, "crawler_requests_total", status="200", error_kind="") == 4
    assert value(s, "crawler_requests_total", status="404", error_kind="http_status") == 1
    assert value(s, "crawler_requests_total", status="503", error_kind="http_status") == 2
    assert sum(v for (name, _), v in s.items() if name == "crawler_requests_total") == 7
    assert value(s, "crawler_request_duration_seconds_count") == 7
    assert value(s, "crawler_request_duration_seconds_bucket", le="+Inf") == 7
    assert value(s, "crawler_retries_total") == 2
    assert value(s, "crawler_in_flight") == 0
    # The duplicate is not fetched and not written by a worker: the ledger fills it in at the end.
    assert value(s, "crawler_results_written_total") == 5
    assert value(s, "crawler_write_lag_seconds_count") == 5
    assert value(s, "crawler_cache_hits_total", kind="duplicate") == 1
    assert value(s, "crawler_chunks", state="done") == 3
    assert value(s, "crawler_chunks", state="pending") == value(s, "crawler_chunks", state="leased") == 0
    assert value(s, "crawler_worker_restarts_total") == 0


async def test_fresh_and_revalidated_cache_hits_are_counted_by_kind(session_dsn, db, mock_url, tmp_path):
    lines = [f"{mock_url}/ok/metrics-fresh", f"{mock_url}/etag/metrics-revalidated"]
    await run_crawl(session_dsn, lines, tmp_path, "metrics-cache-first", cache_ttl=60.0)
    await db.execute(
        "UPDATE response_cache SET fetched_at = now() - interval '1 hour' WHERE final_url = $1",
        f"{mock_url}/etag/metrics-revalidated",
    )
    with Exporter("127.0.0.1", 0) as exporter:
        await run_crawl(session_dsn, lines, tmp_path, "metrics-cache-second", cache_ttl=60.0)
        s = await scrape(exporter.port)
    assert value(s, "crawler_cache_hits_total", kind="fresh") == 1
    assert value(s, "crawler_cache_hits_total", kind="revalidated") == 1
    assert value(s, "crawler_requests_total", status="304", error_kind="") == 1  # the revalidation
    assert value(s, "crawler_request_duration_seconds_count") == 1
    assert value(s, "crawler_results_written_total") == 2


async def test_a_killed_workers_in_flight_requests_stay_until_its_exit_is_reported(session_dsn, db, mock_url, exporter):
    url = f"{mock_url}/slow-body/500/100/metrics"  # 50 s of body, one byte each half second
    job = await create_job(db, name=None, input="metrics-killed-worker", settings={})
    await store_chunk(db, job.id, 0, [RequestRow(1, "GET", url, fingerprint("GET", url))])
    await mark_ingested(db, job.id)
    proc = multiprocessing.get_context("spawn").Process(
        target=run_worker, args=(session_dsn, job.id, test_settings(workers=1).as_dict())
    )
    proc.start()
    try:
        for _ in range(600):  # up to a minute for the spawn, its imports and the request to start
            if value(await scrape(exporter.port), "crawler_in_flight") == 1 or not proc.is_alive():
                break
            await asyncio.sleep(0.1)
        assert proc.is_alive()
        assert value(await scrape(exporter.port), "crawler_in_flight") == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.join, 30)
        await set_job_state(db, job.id, "interrupted")
    assert value(await scrape(exporter.port), "crawler_in_flight") == 1  # a dead process's gauge stays...
    exporter.worker_exited(proc.pid)  # what the supervisor does when it reaps a dead worker
    s = await scrape(exporter.port)
    assert value(s, "crawler_in_flight") == 0  # ...until the parent says it is gone
    assert value(s, "crawler_request_duration_seconds_count") == 0  # the attempt never ended


async def test_an_empty_file_of_a_worker_killed_while_starting_does_not_fail_the_scrape(exporter):
    # A worker creates its file empty and sizes it next; killed in between, it leaves it so.
    open(os.path.join(exporter.directory, "counter_999999.db"), "wb").close()
    exporter.worker_restarted()
    assert value(await scrape(exporter.port), "crawler_worker_restarts_total") == 1


async def committed(dsn: str) -> int:
    """Results committed for the newest job. The dead worker's counters stay in the sum (its
    multiprocess file outlives it), so the quick rows must be committed before the kill, or the
    new worker fetches them again and they count twice."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM results WHERE job_id = (SELECT max(id) FROM jobs)")
    finally:
        await conn.close()


async def test_crawl_with_metrics_port_serves_the_workers_counts_while_it_runs(session_dsn, mock_url, tmp_path):
    path = tmp_path / "cli.txt"
    slow = f"{mock_url}/slow-body/600/100/cli"  # a minute of body: it holds the crawl open
    path.write_text("".join(f"{mock_url}/ok/cli/{i}\n" for i in range(3)) + slow + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_DIR}
    env["CRAWLER_DRAIN_GRACE"] = "0.1"  # Ctrl-C at the end: the slow request is not waited for
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crawler",
        "crawl",
        str(path),
        "--dsn",
        session_dsn,
        "--workers",
        "1",
        "--allow-net",
        "127.0.0.0/8",
        "--metrics-port",
        str(port),
        "--quiet",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    s: Samples = {}
    try:
        for _ in range(600):  # up to a minute for the start, the three quick rows and a poll
            try:
                s = await scrape(port)
            except aiohttp.ClientConnectionError:
                s = {}  # not serving yet
            if (
                value(s, "crawler_requests_total", status="200", error_kind="") == 3
                and value(s, "crawler_in_flight") == 1
                and value(s, "crawler_chunks", state="leased") == 1
                and await committed(session_dsn) == 3
            ):
                break
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        # The worker killed mid-request: the supervisor restarts it and counts the restart; the
        # dead one's in-flight request vanishes from the gauge, the new one fetches the slow row again.
        [worker] = [
            c
            for c in psutil.Process(proc.pid).children()
            if "multiprocessing.spawn" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
        ]
        worker.kill()
        for _ in range(600):
            s = await scrape(port)
            # The chunk gauge is the supervisor's poll: the dead worker's chunk is released (pending)
            # and leased again by the new worker, which the next poll shows.
            if (
                value(s, "crawler_worker_restarts_total") == 1
                and value(s, "crawler_in_flight") == 1
                and value(s, "crawler_chunks", state="leased") == 1
            ):
                break
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert value(s, "crawler_requests_total", status="200", error_kind="") == 3, err.decode()
    assert value(s, "crawler_worker_restarts_total") == 1, err.decode()
    assert value(s, "crawler_in_flight") == 1
    assert value(s, "crawler_chunks", state="leased") == 1
    assert value(s, "crawler_results_written_total") == value(s, "crawler_write_lag_seconds_count") <= 3
    assert proc.returncode == EXIT_INTERRUPTED, err.decode()
    with pytest.raises(aiohttp.ClientConnectionError):  # the endpoint ends with the crawl
        await scrape(port)


def test_without_a_metrics_directory_a_worker_counts_nothing(monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    hooks = metrics.for_worker()
    assert isinstance(hooks, metrics.NoMetrics) and metrics.for_worker() is hooks

    # The no-op stands in for every hook a worker calls.
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert public(metrics.NoMetrics) == public(metrics.WorkerMetrics)


def test_metrics_are_off_unless_a_port_is_set():
    assert Exporter.start(test_settings()) is None


def test_with_metrics_off_no_process_imports_prometheus_client():
    """Its import costs every process 35-40 ms of CPU: the supervisor's and a worker's modules,
    with metrics off, never load it."""
    code = (
        "import sys; import crawler.cli, crawler.job.crawl, crawler.fetch.worker; from crawler import metrics;"
        " from crawler.settings import Settings; metrics.for_worker().fetch_started();"
        " assert metrics.Exporter.start(Settings()) is None;"
        " print('prometheus_client' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_DIR}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


async def test_a_closed_exporter_leaves_nothing_behind_and_a_taken_port_is_one_sentence(monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    with Exporter("127.0.0.1", 0) as exporter:
        assert os.environ[MULTIPROC_DIR] == exporter.directory
        with pytest.raises(UsageError, match=f"127.0.0.1:{exporter.port} .*choose another --metrics-port"):
            Exporter("127.0.0.1", exporter.port)
        assert os.environ[MULTIPROC_DIR] == exporter.directory
    assert MULTIPROC_DIR not in os.environ
    assert not os.path.exists(exporter.directory)
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(exporter.port)
