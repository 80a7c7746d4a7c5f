"""Workers started before their job exists (crawler/job/standby.py): they take the job when it comes,
end when none comes, are replaced when they die waiting, and work in the environment of the
moment the job is given, not of the moment they started."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from conftest import test_settings
from crawler.cli import main
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.job.standby import Standby
from crawler.metrics import MULTIPROC_DIR, Exporter
from test_metrics import scrape, value


def urls_file(tmp_path: Path, mock_url: str, count: int, tag: str) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{mock_url}/ok/{tag}/{i}\n" for i in range(count)))
    return path


async def crawl_with(dsn: str, path: Path, standby: Standby, name: str, **overrides) -> int:
    return await crawl(
        dsn,
        test_settings(**overrides),
        input_path=str(path),
        url_column=None,
        job_name=name,
        summary_json=None,
        quiet=True,
        standby=standby,
    )


async def worker_pids(db, name: str) -> set[int]:
    rows = await db.fetch("SELECT w.pid FROM workers w JOIN jobs j ON j.id = w.job_id WHERE j.name = $1", name)
    return {r["pid"] for r in rows}


async def result_count(db, name: str) -> int:
    return await db.fetchval("SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1", name)


def test_workers_given_no_job_are_ended():
    with Standby(2) as standby:
        processes = [process for process, _ in standby.waiting]
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    # Ended whether they were still importing or already waiting; nothing left behind.
    assert all(p.exitcode is not None for p in processes)
    assert not set(processes) & set(multiprocessing.active_children())


async def test_the_job_runs_on_the_workers_started_before_it(session_dsn, db, mock_url, tmp_path):
    path = urls_file(tmp_path, mock_url, 300, "standby")
    with Standby(2) as standby:
        started = {process.pid for process, _ in standby.waiting}
        assert await crawl_with(session_dsn, path, standby, "standby-taken") == EXIT_OK
        assert standby.waiting == []  # all taken
    assert await worker_pids(db, "standby-taken") == started
    assert await result_count(db, "standby-taken") == 300


async def test_more_workers_standing_by_than_the_job_takes_are_ended(session_dsn, db, mock_url, tmp_path):
    path = urls_file(tmp_path, mock_url, 50, "fewer")
    with Standby(3) as standby:
        processes = [process for process, _ in standby.waiting]
        assert await crawl_with(session_dsn, path, standby, "standby-fewer", workers=1) == EXIT_OK
    assert await worker_pids(db, "standby-fewer") == {processes[0].pid}
    assert all(p.exitcode is not None for p in processes)


async def test_a_worker_that_died_standing_by_is_replaced(session_dsn, db, mock_url, tmp_path):
    path = urls_file(tmp_path, mock_url, 300, "died")
    with Standby(2) as standby:
        dead, alive = (process for process, _ in standby.waiting)
        os.kill(dead.pid, signal.SIGKILL)
        dead.join()
        assert await crawl_with(session_dsn, path, standby, "standby-died", restart_backoff=0.01) == EXIT_OK
    pids = await worker_pids(db, "standby-died")
    assert dead.pid not in pids and alive.pid in pids and len(pids) == 2  # the dead one's replacement
    assert await result_count(db, "standby-died") == 300


async def test_workers_count_into_metrics_served_after_they_started(session_dsn, mock_url, tmp_path, monkeypatch):
    # As under `crawler crawl --metrics-port`: the workers start first, the metrics directory is
    # set later; the order carries it to them.
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    path = urls_file(tmp_path, mock_url, 40, "metrics")
    with Standby(1) as standby, Exporter("127.0.0.1", 0) as exporter:
        assert await crawl_with(session_dsn, path, standby, "standby-metrics", workers=1) == EXIT_OK
        samples = await scrape(exporter.port)
    assert value(samples, "crawler_requests_total", status="200", error_kind="") == 40


def test_a_crawl_that_fails_before_its_job_ends_its_workers(session_dsn, tmp_path, monkeypatch, capsys):
    # setup_logging exports these; monkeypatch puts them back for later tests.
    monkeypatch.setenv("CRAWLER_LOG_LEVEL", os.environ.get("CRAWLER_LOG_LEVEL", "WARNING"))
    monkeypatch.setenv("CRAWLER_LOG_FORMAT", os.environ.get("CRAWLER_LOG_FORMAT", "text"))
    before = set(multiprocessing.active_children())
    missing = tmp_path / "missing.csv"
    code = main(["crawl", str(missing), "--workers", "2", "--dsn", session_dsn])
    assert code != EXIT_OK
    err = capsys.readouterr().err
    assert err.startswith("crawler: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert set(multiprocessing.active_children()) == before
