"""Signals a user or a machine sends, with real processes: the supervisor killed alone (its
workers notice, drain and stop; resume finishes), and SIGTERM to `crawler worker` (its processes
drain and give their leases back; another worker finishes the job)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import asyncpg
import psutil
import pytest

from conftest import ROOT
from test_faults import (
    assert_exactly_once,
    cli,
    crawl_process,
    finish,
    kill_tree,
    owner,
    server_hits,
    wait_for_results,
    workers_of,
)

pytestmark = [pytest.mark.slow, pytest.mark.one_server]


async def leased_chunks(dsn: str, name: str, owners: list[str] | None = None) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM chunks c JOIN jobs j ON j.id = c.job_id WHERE j.name = $1 AND c.state = 'leased'"
            " AND ($2::text[] IS NULL OR c.lease_owner = ANY($2))",
            name,
            owners,
        )
    finally:
        await conn.close()


async def stored(dsn: str, name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1", name
        )
    finally:
        await conn.close()


async def gone(processes: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_supervisor_killed_alone_leaves_workers_that_drain_and_stop(session_dsn, mock_process, tmp_path):
    # 50 ms per answer: at most 2 x 50 in flight, 2 000 answers a second, so the job lasts well past
    # the second it takes an orphaned worker to notice; the rows it has not reached then show the drain.
    rows = 6000
    (tmp_path / "urls.csv").write_text("url\n" + "".join(f"{mock_process}/delay/50/{i}\n" for i in range(rows)))
    name = "supervisor-killed-alone"
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name)
    workers: list[psutil.Process] = []
    try:
        await wait_for_results(session_dsn, name, 1000, proc)
        workers = workers_of(proc)
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)  # the supervisor only: its workers are left running
        proc.wait(10)
        # Orphaned, each worker drains: finishes what is in flight, writes it, gives back the rest.
        assert await gone(workers, timeout=60), [p.pid for p in workers if p.is_running()]
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        if proc.poll() is None:
            kill_tree(proc)
    assert await leased_chunks(session_dsn, name) == 0
    kept = await stored(session_dsn, name)
    assert 1000 <= kept < rows
    assert await server_hits(mock_process) == kept  # every answer fetched was written

    resumed = cli("resume", name, "--dsn", session_dsn, "--workers", "2", "--allow-net", "127.0.0.1/32", "--quiet")
    assert resumed.returncode == 0, resumed.stderr.decode()
    await assert_exactly_once(session_dsn, name, rows)
    assert await server_hits(mock_process) == rows  # nothing fetched twice


def host_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crawler", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )


async def test_sigterm_to_crawler_worker_drains_and_gives_its_leases_back(session_dsn, mock_process, tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{mock_process}/delay/20/{i}\n" for i in range(3000)))
    rows, name = 3000, "worker-sigterm"
    supervisor = host_process(
        "crawl",
        str(path),
        "--dsn",
        session_dsn,
        "--job-name",
        name,
        "--workers",
        "0",
        "--chunk-size",
        "100",
        "--allow-net",
        "127.0.0.1/32",
        "--quiet",
    )
    hosts: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        while cli("status", name, "--dsn", session_dsn).returncode != 0:
            assert time.monotonic() < deadline and supervisor.poll() is None, "the job was not created"
            await asyncio.sleep(0.1)
        first = host_process("worker", "--dsn", session_dsn, "--job", name, "--workers", "1", "--concurrency", "10")
        hosts.append(first)
        await wait_for_results(session_dsn, name, 300, supervisor)
        processes = psutil.Process(first.pid).children(recursive=True)
        owners = [owner(p) for p in processes]
        first.send_signal(signal.SIGTERM)  # the `crawler worker` process alone, as a service manager does
        code, err = finish(first, timeout=60)
        assert code == 130, err
        assert await gone(processes, timeout=10)
        assert await leased_chunks(session_dsn, name, owners) == 0  # given back, not left to expire
        kept = await stored(session_dsn, name)
        assert await server_hits(mock_process) == kept  # its in-flight requests finished and were written
        assert kept < rows

        second = host_process("worker", "--dsn", session_dsn, "--job", name, "--workers", "1", "--concurrency", "20")
        hosts.append(second)
        code, err = finish(second, timeout=120)
        assert code == 0, err
        code, err = finish(supervisor, timeout=60)
        assert code == 0, err
    finally:
        for proc in [supervisor, *hosts]:
            if proc.poll() is None:
                kill_tree(proc)
    await assert_exactly_once(session_dsn, name, rows)
    assert await server_hits(mock_process) == rows
