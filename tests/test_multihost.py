"""Several machines on one job, played by separate `crawler worker` process groups on this one:
`crawl --workers 0` only ingests and supervises; the "hosts" wait for the job, share its chunks
through PostgreSQL, survive one host killed and another frozen (as good as cut off), and keep a
host's politeness budget whole however many of them fetch. tests/test_netns.py runs the same
with real network links."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from conftest import ROOT, run_cli
from crawler.ledger.jobs import create_job, set_job_state
from test_faults import assert_exactly_once, results_so_far, unlocked

pytestmark = [pytest.mark.slow, pytest.mark.one_server]

# Short leases, so that the chunks of a lost host come back within the test.
FAST_LEASES = {"CRAWLER_LEASE_SECONDS": "2", "CRAWLER_HEARTBEAT_SECONDS": "0.3"}


def crawler(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`crawler ARGS` in a session of its own: one "host", killed or frozen as a whole."""
    return subprocess.Popen(
        [sys.executable, "-m", "crawler", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **FAST_LEASES, **(env or {})},
        cwd=ROOT,
        start_new_session=True,
    )


def signal_host(host: subprocess.Popen, sig: int) -> None:
    """Every process of the host's session: the `crawler worker` and its worker processes (each
    worker has a process group of its own, so killpg would miss them)."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == host.pid:
                proc.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def session_of(host: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == host.pid:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


async def settled_leases(dsn: str, name: str, owners: list[str]) -> set[int]:
    """The chunks these (stopped) owners hold, once a COMMIT sent before they stopped has landed:
    the same on two reads in a row."""

    async def read() -> set[int]:
        conn = await asyncpg.connect(dsn)
        try:
            return {
                r["chunk_no"]
                for r in await conn.fetch(
                    "SELECT c.chunk_no FROM chunks c JOIN jobs j ON j.id = c.job_id"
                    " WHERE j.name = $1 AND c.state = 'leased' AND c.lease_owner = ANY($2)",
                    name,
                    owners,
                )
            }
        finally:
            await conn.close()

    last = await read()
    for _ in range(200):
        await asyncio.sleep(0.05)
        now = await read()
        if now == last:
            return now
        last = now
    raise AssertionError("the stopped host's leases kept changing")


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            signal_host(proc, signal.SIGCONT)
            signal_host(proc, signal.SIGKILL)
            proc.wait(10)


async def status_of(dsn: str, name: str) -> dict:
    return json.loads((await asyncio.to_thread(run_cli, "status", name, "--dsn", dsn, "--json")).stdout or "{}")


async def live_workers(dsn: str, name: str) -> list[dict]:
    return (await status_of(dsn, name)).get("workers", [])


def write_input(path: Path, base: str, count: int) -> int:
    """Requests of 20 ms each: with a few fetch tasks per host, the job lasts long enough to lose
    hosts in the middle of it."""
    path.write_text("url\n" + "".join(f"{base}/delay/20/{i}\n" for i in range(count)))
    return count


async def everyone_counted_the_others(dsn: str, name: str, seen: dict) -> bool:
    """Each worker counts the job's live workers right after its heartbeat: once every worker has
    beaten twice since the last one joined, each has counted all of them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT w.worker_id, w.heartbeat_at, max(w.started_at) OVER () AS joined FROM workers w"
            " JOIN jobs j ON j.id = w.job_id WHERE j.name = $1",
            name,
        )
    finally:
        await conn.close()
    if not seen:  # `seen` keeps each worker's first heartbeat after the last one joined
        if rows and all(r["heartbeat_at"] > r["joined"] for r in rows):
            seen.update((r["worker_id"], r["heartbeat_at"]) for r in rows)
        return False
    return all(r["heartbeat_at"] > seen[r["worker_id"]] for r in rows)


async def wait_until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_all([proc])
        raise
    return proc.returncode, err.decode()


async def test_three_hosts_share_a_job_one_killed_one_frozen(fresh_dsn, mock_process, tmp_path: Path):
    rows = write_input(tmp_path / "urls.csv", mock_process, count=5000)
    name = "three-hosts"
    # The hosts start first and wait for a job; the supervisor fetches nothing itself.
    hosts = [crawler("worker", "--dsn", fresh_dsn, "--workers", "1", "--concurrency", "5") for _ in range(3)]
    supervisor = crawler(
        "crawl",
        str(tmp_path / "urls.csv"),
        "--dsn",
        fresh_dsn,
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
    try:
        seen = {}

        async def everyone_joined() -> bool:
            seen.update(await status_of(fresh_dsn, name))
            return len(seen.get("workers", [])) == 3

        await wait_until(everyone_joined, "three workers joining the job")
        assert [h["workers"] for h in seen["hosts"]] == [3]  # one machine name here; netns tests give three

        async def some_results() -> bool:
            assert supervisor.poll() is None, supervisor.stderr.read().decode()
            return await results_so_far(fresh_dsn, name) >= 1000

        await wait_until(some_results, "1000 results")
        signal_host(hosts[0], signal.SIGKILL)  # a host lost whole
        # A host cut off: alive, holding leases, silent. Frozen while it holds one (between two
        # chunks it holds none and would prove nothing) and no lock on it (frozen inside a write,
        # its chunks could not be taken over); caught otherwise, it is let go and frozen again.
        frozen_owners = [f"{socket.gethostname()}:{p.pid}" for p in session_of(hosts[1])]
        deadline = time.monotonic() + 60
        while True:
            signal_host(hosts[1], signal.SIGSTOP)
            held = await settled_leases(fresh_dsn, name, frozen_owners)
            if held and await unlocked(fresh_dsn, name, sorted(held)):
                break
            signal_host(hosts[1], signal.SIGCONT)
            assert time.monotonic() < deadline, "the host to freeze never held a lease"
            await asyncio.sleep(0.02)
        code, err = finish(supervisor)
        assert code == 0, err
        await assert_exactly_once(fresh_dsn, name, rows)
        # The frozen host comes back to a finished job: its late results are refused, it leaves.
        signal_host(hosts[1], signal.SIGCONT)
        code, err = finish(hosts[1])
        assert code == 0, err
        lost = re.findall(r"lost the lease on chunk (\d+)", err)
        assert len(lost) == len(set(lost))  # said once: the chunk is let go, not worked on
        # ...and said for the chunks it held when frozen, which the others took over and finished.
        fenced = {int(n) for n in re.findall(r"(?:lost the lease on chunk|results for chunk) (\d+)", err)}
        assert fenced & held, (sorted(held), err[-2000:])
        code, err = finish(hosts[2])
        assert code == 0, err
        assert "joining job" in err
        await assert_exactly_once(fresh_dsn, name, rows)
    finally:
        stop_all([supervisor, *hosts])


async def test_a_hosts_budget_is_shared_by_every_machine_not_multiplied(fresh_dsn, mock_process, tmp_path: Path):
    """Per-host limits hold across machines: three hosts with a fixed budget of 6 requests in
    flight to one server never send it more than 6 at once."""
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{mock_process}/delay/20/{i}\n" for i in range(3000)))
    name = "shared-budget"
    supervisor = crawler(
        "crawl",
        str(path),
        "--dsn",
        fresh_dsn,
        "--job-name",
        name,
        "--workers",
        "0",
        "--chunk-size",
        "50",
        "--per-host-concurrency",
        "6",
        "--no-adaptive",
        "--allow-net",
        "127.0.0.1/32",
        "--quiet",
    )
    hosts = []
    try:

        async def created() -> bool:
            return run_cli("status", name, "--dsn", fresh_dsn).returncode == 0

        await wait_until(created, "the job being created")
        hosts = [
            crawler("worker", "--dsn", fresh_dsn, "--job", name, "--workers", "1", "--concurrency", "50")
            for _ in range(3)
        ]

        async def everyone_joined() -> bool:
            return len(await live_workers(fresh_dsn, name)) == 3

        await wait_until(everyone_joined, "three workers joining the job")
        first_beats: dict = {}
        await wait_until(
            lambda: everyone_counted_the_others(fresh_dsn, name, first_beats), "every worker counting the others"
        )
        async with aiohttp.ClientSession() as session:
            await session.post(f"{mock_process}/__stats/reset")

            async def watched_enough() -> bool:
                stats.update(await (await session.get(f"{mock_process}/__stats")).json())
                return stats["hits"]["total"] >= 300

            stats: dict = {}
            await wait_until(watched_enough, "300 requests while the budget is watched")
        assert supervisor.poll() is None, "the job ended before the budget was measured"
        assert stats["max_in_flight"] <= 6
        code, err = finish(supervisor)
        assert code == 0, err
        assert all(finish(host)[0] == 0 for host in hosts)
        await assert_exactly_once(fresh_dsn, name, 3000)
    finally:
        stop_all([supervisor, *hosts])


def test_a_worker_for_a_job_that_does_not_exist_says_so(session_dsn):
    proc = run_cli("worker", "--dsn", session_dsn, "--job", "no-such-job")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "crawler: no job with id or name 'no-such-job'; `crawler jobs` lists them."


async def test_a_worker_leaves_a_job_that_was_stopped_before_its_input_was_read(session_dsn):
    """An interrupted job waits for `crawler resume`; a worker on another machine does not wait
    with it (forever, since no more input comes until then)."""
    conn = await asyncpg.connect(session_dsn)
    try:
        job = await create_job(conn, name="stopped-early", input="/nonexistent.csv", settings={})
        await set_job_state(conn, job.id, "interrupted")
    finally:
        await conn.close()
    proc = await asyncio.to_thread(
        run_cli, "worker", "--dsn", session_dsn, "--job", "stopped-early", "--workers", "1", timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()
