"""--robots obey end to end: real worker processes, a real PostgreSQL, one mock server per "host"
(each on its own loopback port, each with its own robots.txt knob). What the hosts received is
counted on the servers' side: robots.txt fetches, and when each request arrived."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from conftest import ROOT, run_cli, test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.mock.server import start_mock_server


@contextlib.asynccontextmanager
async def hosts(*knobs: str):
    """One in-process mock server per robots knob; yields their base URLs."""
    runners, urls = [], []
    try:
        for knob in knobs:
            runner, url = await start_mock_server(robots=knob)
            runners.append(runner)
            urls.append(url)
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


def server_process(knob: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.mock.server", "--port", "0", "--robots", knob],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    assert "listening on" in line, proc.stderr.read()
    return proc, line.split("listening on ", 1)[1].split()[0]


@contextlib.contextmanager
def host_processes(*knobs: str):
    """One mock server process per robots knob; yields their base URLs. Where the test reads when
    requests arrived: a server in this process stamps an arrival only when the crawl's own work
    on this process's loop lets its handler run, so one late stamp makes the next gap short."""
    servers = []
    try:
        for knob in knobs:
            servers.append(server_process(knob))
        yield [base for _, base in servers]
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.communicate(timeout=10)


def closed_port() -> str:
    """A loopback base URL nothing listens on: robots.txt unreachable (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def stats(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/__hits") as resp:
            hits = await resp.json()
        async with session.get(f"{base}/__arrivals") as resp:
            hits["arrivals"] = (await resp.json())["arrivals"]
    return hits


async def robots_hits(base: str) -> int:
    return (await stats(base))["paths"].get("/robots.txt", 0)


async def run(dsn: str, tmp_path: Path, urls: list[str], name: str, **overrides) -> int:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(f"{u}\n" for u in urls))
    settings = test_settings(**{"robots": "obey", "chunk_size": 10, **overrides})
    return await crawl(
        dsn, settings, input_path=str(path), url_column=None, job_name=name, summary_json=None, quiet=True
    )


async def outcomes(db, name: str) -> dict[str, tuple]:
    rows = await db.fetch(
        "SELECT q.url, r.status, r.error_kind, r.error FROM results r JOIN jobs j ON j.id = r.job_id"
        " JOIN requests q ON q.job_id = r.job_id AND q.row_no = r.row_no WHERE j.name = $1",
        name,
    )
    return {r["url"]: (r["status"], r["error_kind"], r["error"]) for r in rows}


async def test_each_rfc_9309_case_decides_its_hosts_rows(session_dsn, db, tmp_path):
    async with hosts(
        "disallow",
        "wildcard",
        "agent",
        "none",
        "status:500",
        "status:403",
        "redirects:6",
        "redirect",
        "flaky:1",
        "huge",
    ) as (rules, wild, agent, missing, error, forbidden, loop, moved, flaky, huge):
        down = closed_port()
        urls = []
        for base in (rules, missing, error, forbidden, loop, moved, flaky, down):
            urls += [f"{base}/private/x", f"{base}/private/open/x", f"{base}/ok/1"]
        urls += [f"{wild}/ok/a.pdf", f"{wild}/ok/a.pdf?v=1", f"{wild}/ok/draft/2"]
        urls += [f"{agent}/ok/1", f"{agent}/ok/crawler-only/1"]
        urls += [f"{huge}/early/1", f"{huge}/late/1"]
        assert await run(session_dsn, tmp_path, urls, "rfc-cases", max_attempts=3) == EXIT_OK
        got = await outcomes(db, "rfc-cases")
        hits = {
            base: await robots_hits(base)
            for base in (rules, wild, agent, missing, error, forbidden, loop, moved, flaky, huge)
        }

    refused = ("robots", "disallowed by robots.txt (Disallow: /private/)")
    # robots.txt read: its rules decide, the longer Allow winning; the rule named in `error`
    assert got[f"{rules}/private/x"][1:] == refused
    assert got[f"{rules}/private/open/x"][:2] == (404, "http_status")  # allowed, so fetched (the mock has no such path)
    assert got[f"{rules}/ok/1"] == (200, None, None)
    assert got[f"{wild}/ok/a.pdf"][1:] == ("robots", "disallowed by robots.txt (Disallow: /*.pdf$)")
    assert got[f"{wild}/ok/a.pdf?v=1"][0] == 200
    assert got[f"{wild}/ok/draft/2"][1:] == ("robots", "disallowed by robots.txt (Disallow: /*/draft/)")
    assert got[f"{agent}/ok/1"][0] == 200  # the `crawler` group, not `*` (which disallows all)
    assert got[f"{agent}/ok/crawler-only/1"][1] == "robots"
    assert got[f"{huge}/early/1"][1] == "robots" and got[f"{huge}/late/1"][1] == "http_status"  # past 500 KiB
    # 4xx (404, 403) and a redirect chain too long (6 > 5): everything allowed
    for base in (missing, forbidden, loop):
        assert got[f"{base}/private/x"][1] == "http_status" and got[f"{base}/ok/1"][0] == 200
    # a redirect followed: the file it leads to decides
    assert got[f"{moved}/private/x"][1:] == refused and got[f"{moved}/ok/1"][0] == 200
    # a 500 once, then the file: retried within the job, then obeyed
    assert got[f"{flaky}/private/x"][1:] == refused and got[f"{flaky}/ok/1"][0] == 200
    # 500 every time, or nobody listening: after the job's 3 attempts, every row is `robots` with the reason
    for url in (f"{error}/ok/1", f"{error}/private/open/x"):
        assert got[url][1:] == ("robots", "robots.txt unreachable: HTTP 500 Internal Server Error (3 attempts)")
    assert got[f"{down}/ok/1"][1] == "robots" and "cannot connect" in got[f"{down}/ok/1"][2]
    assert got[f"{down}/ok/1"][2].endswith("(3 attempts)")
    # once per host, then the retries of the failing ones
    assert hits == {
        rules: 1,
        wild: 1,
        agent: 1,
        missing: 1,
        error: 3,
        forbidden: 1,
        loop: 1,
        moved: 1,
        flaky: 2,
        huge: 1,
    }
    # the ledger keeps each decision per job and host
    job = await db.fetchval("SELECT id FROM jobs WHERE name = 'rfc-cases'")
    verdicts = dict(await db.fetch("SELECT host, verdict FROM robots WHERE job_id = $1", job))
    assert verdicts[rules] == "rules" and verdicts[missing] == "allow_all" and verdicts[loop] == "allow_all"
    assert verdicts[error] == "unreachable" and verdicts[down] == "unreachable" and len(verdicts) == 11
    # and the summary counts the kind like any other, and the hosts by verdict
    status = json.loads(run_cli("status", "rfc-cases", "--dsn", session_dsn, "--json").stdout)
    # refused: 7 rows by rules (rules, moved, flaky, huge, agent: 1 each; wild: 2), 6 by unreachable hosts
    assert status["errors"]["robots"]["count"] == 13
    assert status["robots"] == {"hosts": {"rules": 6, "allow_all": 3, "unreachable": 2}, "requests": 16}


async def test_robots_txt_is_fetched_once_per_host_however_many_rows_chunks_and_workers(session_dsn, db, tmp_path):
    # robots.txt answered after 2 s: both workers need the hosts' rules while the first fetches them
    async with hosts("slow:2000", "slow:2000", "allow") as bases:
        urls = [f"{base}/ok/{i}" for i in range(150) for base in bases]
        urls += [f"{base}/private/{i}" for i in range(50) for base in bases]
        assert await run(session_dsn, tmp_path, urls, "once-per-host", workers=2, concurrency=10) == EXIT_OK
        hits = [await robots_hits(base) for base in bases]
        got = await outcomes(db, "once-per-host")
        total_hits = [(await stats(base))["total"] for base in bases]
    assert hits == [1, 1, 1]
    kinds = [got[f"{bases[0]}/private/{i}"][1] for i in range(50)]
    assert kinds == ["robots"] * 50
    assert all(got[f"{bases[2]}/private/{i}"][1] == "http_status" for i in range(50))  # allowed there
    # a refused row is never requested: the disallowing hosts saw 150 rows and robots.txt
    assert total_hits == [151, 151, 201]
    # both workers took part (the rows were spread over 60 chunks)
    job = await db.fetchval("SELECT id FROM jobs WHERE name = 'once-per-host'")
    assert await db.fetchval("SELECT count(*) FROM workers WHERE job_id = $1 AND fetched > 0", job) == 2


async def test_ignore_reads_no_robots_txt(session_dsn, db, tmp_path):
    async with hosts("disallow") as (base,):
        assert (
            await run(session_dsn, tmp_path, [f"{base}/private/1", f"{base}/ok/1"], "ignored", robots="ignore")
            == EXIT_OK
        )
        assert await robots_hits(base) == 0
        got = await outcomes(db, "ignored")
    assert got[f"{base}/private/1"][1] == "http_status" and got[f"{base}/ok/1"][0] == 200


async def test_crawl_delay_paces_the_host_as_the_server_sees_it(session_dsn, db, tmp_path):
    with host_processes("delay:0.4", "allow") as (slow, fast):
        # /flaky/0/.. answers 200 at once and is routed, so the server records each arrival
        urls = [f"{slow}/flaky/0/{i}" for i in range(5)] + [f"{fast}/flaky/0/{i}" for i in range(5)]
        assert await run(session_dsn, tmp_path, urls, "crawl-delay", workers=1) == EXIT_OK
        slow_arrivals = [t for t, _ in (await stats(slow))["arrivals"]]
        fast_arrivals = [t for t, path in (await stats(fast))["arrivals"] if path != "/robots.txt"]
    assert len(slow_arrivals) == 6  # robots.txt, then the rows
    gaps = [b - a for a, b in itertools.pairwise(slow_arrivals)]
    # 0.4 s apart, robots.txt's own request included; a timer may fire a hair early (its clock's resolution)
    assert min(gaps) >= 0.39, gaps
    # The other host is not held back: its rows are all in before the paced host's last one (both
    # servers stamp arrivals with the system's clock; no bound on the test's own time).
    assert len(fast_arrivals) == 5 and max(fast_arrivals) < slow_arrivals[-1], (fast_arrivals, slow_arrivals)


async def test_a_crawl_delay_longer_than_the_cap_is_capped(session_dsn, db, tmp_path):
    with host_processes("delay:3600") as (base,):
        urls = [f"{base}/flaky/0/{i}" for i in range(3)]
        assert await run(session_dsn, tmp_path, urls, "capped-delay", workers=1, robots_max_delay=0.3) == EXIT_OK
        arrivals = [t for t, _ in (await stats(base))["arrivals"]]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 4 and min(gaps) >= 0.29, gaps


async def test_cache_ttl_reuses_robots_txt_in_a_later_job(session_dsn, db, tmp_path):
    async with hosts("disallow") as (base,):
        first = [f"{base}/private/a", f"{base}/ok/a"]
        assert await run(session_dsn, tmp_path, first, "robots-cache-1", cache_ttl=3600.0) == EXIT_OK
        second = [f"{base}/private/b", f"{base}/ok/b"]  # other URLs: rows are fetched, robots.txt is not
        assert await run(session_dsn, tmp_path, second, "robots-cache-2", cache_ttl=3600.0) == EXIT_OK
        assert await robots_hits(base) == 1
        third = [f"{base}/private/c"]
        assert await run(session_dsn, tmp_path, third, "robots-cache-3") == EXIT_OK  # no --cache-ttl: fetched again
        assert await robots_hits(base) == 2
        got = await outcomes(db, "robots-cache-2")
    assert got[f"{base}/private/b"][1] == "robots" and got[f"{base}/ok/b"][0] == 200
    reused = await db.fetchval(
        "SELECT r.reused_from = (SELECT id FROM jobs WHERE name = 'robots-cache-1') FROM robots r"
        " JOIN jobs j ON j.id = r.job_id WHERE j.name = 'robots-cache-2'"
    )
    assert reused


# --- kill -9 and resume ---------------------------------------------------------------------------


async def test_a_resume_after_kill_9_does_not_fetch_decided_robots_txt_again(session_dsn, tmp_path):
    from test_faults import kill_tree

    servers = [server_process("disallow"), server_process("allow")]
    bases = [base for _, base in servers]
    try:
        path = tmp_path / "urls.txt"
        rows = [f"{base}/delay/20/{i}" for i in range(300) for base in bases] + [f"{bases[0]}/private/1"]
        path.write_text("".join(f"{u}\n" for u in rows))
        env = {**os.environ, "CRAWLER_HEARTBEAT_SECONDS": "0.3", "CRAWLER_LEASE_SECONDS": "2"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crawler",
                "crawl",
                str(path),
                "--dsn",
                session_dsn,
                "--job-name",
                "robots-kill",
                "--robots",
                "obey",
                "--workers",
                "2",
                "--concurrency",
                "4",
                "--chunk-size",
                "20",
                "--per-host-concurrency",
                "2",
                "--no-adaptive",
                "--allow-net",
                "127.0.0.1/32",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        conn = await asyncpg.connect(session_dsn)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                decided = await conn.fetchval(
                    "SELECT count(*) FROM robots r JOIN jobs j ON j.id = r.job_id"
                    " WHERE j.name = 'robots-kill' AND r.verdict IS NOT NULL"
                )
                done = await conn.fetchval(
                    "SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = 'robots-kill'"
                )
                if decided == 2 and done >= 50:
                    break
                assert proc.poll() is None, proc.stderr.read().decode()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("both hosts were not decided with 50 results within 60 s")
        finally:
            kill_tree(proc)  # the supervisor and its workers, as a machine losing power would
        assert proc.returncode == -signal.SIGKILL
        before = [await robots_hits(base) for base in bases]
        resumed = subprocess.run(
            [
                sys.executable,
                "-m",
                "crawler",
                "resume",
                "robots-kill",
                "--dsn",
                session_dsn,
                "--workers",
                "2",
                "--allow-net",
                "127.0.0.1/32",
                "--quiet",
            ],
            capture_output=True,
            env=env,
            cwd=ROOT,
            timeout=180,
        )
        assert resumed.returncode == 0, resumed.stderr.decode()
        after = [await robots_hits(base) for base in bases]
        try:
            job = await conn.fetchval("SELECT id FROM jobs WHERE name = 'robots-kill'")
            kinds = dict(
                await conn.fetch("SELECT error_kind, count(*) FROM results WHERE job_id = $1 GROUP BY error_kind", job)
            )
            assert await conn.fetchval("SELECT state FROM jobs WHERE id = $1", job) == "done"
        finally:
            await conn.close()
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(10)
    assert before == after == [1, 1]  # the resume (which was given no --robots) obeyed the job's decisions
    assert kinds == {None: 600, "robots": 1}


async def test_a_drain_while_robots_txt_is_fetched_keeps_its_decision_and_resume_finishes(session_dsn, tmp_path):
    from test_faults import finish, kill_tree

    server, base = server_process("slow:3000")  # robots.txt answered after 3 s
    try:
        path = tmp_path / "urls.txt"
        path.write_text("".join(f"{base}/ok/{i}\n" for i in range(100)) + f"{base}/private/1\n")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crawler",
                "crawl",
                str(path),
                "--dsn",
                session_dsn,
                "--job-name",
                "robots-drain",
                "--robots",
                "obey",
                "--workers",
                "2",
                "--chunk-size",
                "10",
                "--allow-net",
                "127.0.0.1/32",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        conn = await asyncpg.connect(session_dsn)
        try:
            try:
                deadline = time.monotonic() + 60
                while not await conn.fetchval(
                    "SELECT count(*) FROM robots r JOIN jobs j ON j.id = r.job_id"
                    " WHERE j.name = 'robots-drain' AND r.verdict IS NULL AND r.owner IS NOT NULL"
                ):
                    assert time.monotonic() < deadline, "no robots.txt claim within 60 s"
                    assert proc.poll() is None, proc.stderr.read().decode()
                    await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                code, err = finish(proc, timeout=60)
            finally:
                if proc.poll() is None:
                    kill_tree(proc)
            assert code == 130, err
            job = await conn.fetchval("SELECT id FROM jobs WHERE name = 'robots-drain'")
            # the fetch under way finished within the drain's grace and its decision was kept
            assert await conn.fetchval("SELECT verdict FROM robots WHERE job_id = $1", job) == "rules"
            assert await conn.fetchval("SELECT count(*) FROM results WHERE job_id = $1", job) == 0
            resumed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "crawler",
                    "resume",
                    "robots-drain",
                    "--dsn",
                    session_dsn,
                    "--workers",
                    "2",
                    "--allow-net",
                    "127.0.0.1/32",
                    "--quiet",
                ],
                capture_output=True,
                cwd=ROOT,
                timeout=180,
            )
            assert resumed.returncode == 0, resumed.stderr.decode()
            kinds = dict(
                await conn.fetch("SELECT error_kind, count(*) FROM results WHERE job_id = $1 GROUP BY error_kind", job)
            )
        finally:
            await conn.close()
        assert kinds == {None: 100, "robots": 1}
        assert await robots_hits(base) == 1
    finally:
        server.terminate()
        server.wait(10)


def test_bench_spreads_urls_over_hosts_and_counts_robots_txt_requests(session_dsn, tmp_path):
    import json

    from crawler.mock.bench import write_urls

    path = tmp_path / "spread.csv"
    write_urls(path, "http://127.0.0.1:8080", 40, 0.25, 0, hosts=4)
    urls = path.read_text().split()[1:]
    assert {u.split("/")[2] for u in urls} == {f"h{i}.bench.test:8080" for i in range(4)}
    assert len(set(urls)) == 30  # the duplicates as without hosts

    out = tmp_path / "bench.json"
    done = run_cli(
        "bench",
        "--dsn",
        session_dsn,
        "--urls",
        "300",
        "--hosts",
        "30",
        "--robots",
        "obey",
        "--workers",
        "1",
        "--quiet",
        "--summary-json",
        str(out),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr.decode()
    figures = json.loads(out.read_text())["bench"]
    assert figures["robots_txt_requests"] == 30 and figures["server_requests"] == 330


async def test_machines_joining_with_crawler_worker_obey_the_jobs_robots_txt_fetched_once(session_dsn, tmp_path):
    """`crawl --workers 0 --robots obey` and two `crawler worker` "machines" that were given no
    --robots: they take the job's policy, wait on one fetch of robots.txt (answered after 2 s),
    and refuse the same rows."""
    from test_multihost import crawler as machine
    from test_multihost import finish, stop_all

    server, base = server_process("slow:2000")
    procs = []
    try:
        path = tmp_path / "urls.txt"
        path.write_text("".join(f"{base}/ok/{i}\n{base}/private/{i}\n" for i in range(100)))
        procs.append(
            machine(
                "crawl",
                str(path),
                "--dsn",
                session_dsn,
                "--job-name",
                "robots-machines",
                "--robots",
                "obey",
                "--workers",
                "0",
                "--chunk-size",
                "10",
                "--allow-net",
                "127.0.0.1/32",
                "--quiet",
            )
        )
        conn = await asyncpg.connect(session_dsn)
        try:
            deadline = time.monotonic() + 60
            while not await conn.fetchval("SELECT count(*) FROM jobs WHERE name = 'robots-machines'"):
                assert time.monotonic() < deadline and procs[0].poll() is None, "the crawl made no job"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        procs += [
            machine(
                "worker",
                "--dsn",
                session_dsn,
                "--job",
                "robots-machines",
                "--workers",
                "1",
                "--concurrency",
                "5",
                "--allow-net",
                "127.0.0.1/32",
            )
            for _ in range(2)
        ]
        for proc in procs:
            code, err = finish(proc, timeout=180)
            assert code == 0, err
        conn = await asyncpg.connect(session_dsn)
        try:
            job = await conn.fetchval("SELECT id FROM jobs WHERE name = 'robots-machines'")
            kinds = dict(
                await conn.fetch("SELECT error_kind, count(*) FROM results WHERE job_id = $1 GROUP BY error_kind", job)
            )
            fetchers = await conn.fetchval("SELECT count(*) FROM workers WHERE job_id = $1 AND fetched > 0", job)
        finally:
            await conn.close()
        assert kinds == {None: 100, "robots": 100}
        assert fetchers == 2
        assert await robots_hits(base) == 1
    finally:
        stop_all(procs)
        server.terminate()
        server.wait(10)
