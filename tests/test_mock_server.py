"""The mock server counts hits and load, limits capacity, and its multi-process mode stops cleanly.

What each path answers is tested in test_mock_behaviours.
"""

import asyncio
import errno
import os
import signal
import sys
import time

import aiohttp
import psutil
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from crawler.mock.behaviours import random_outcome
from crawler.mock.server import (
    HITS,
    LOAD,
    SEED,
    create_app,
    running_mock_server,
    serve,
    serving_runner,
    start_mock_server,
)

pytestmark = pytest.mark.one_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMEOUT = aiohttp.ClientTimeout(total=20)


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(), timeout=TIMEOUT)


async def test_hits_count_every_path_but_the_stats_endpoint(client):
    for path in ["/ok/a", "/ok/a", "/status/500", "/nowhere", "/status/abc"]:
        await client.get(path)
    await client.get("/redirect/2")
    resp = await client.get("/__hits")
    assert resp.status == 200
    assert await resp.json() == {
        "total": 8,
        "paths": {
            "/ok/a": 2,
            "/status/500": 1,
            "/nowhere": 1,
            "/status/abc": 1,
            "/redirect/2": 1,
            "/redirect/1": 1,
            "/redirect/0": 1,
        },
    }
    assert client.server.app[HITS]["/ok/a"] == 2


async def test_hits_reset_clears_the_counts(client):
    await client.get("/ok/a")
    assert (await client.post("/__hits/reset")).status == 200
    assert await (await client.get("/__hits")).json() == {"total": 0, "paths": {}}
    await client.get("/ok/b")
    assert await (await client.get("/__hits")).json() == {"total": 1, "paths": {"/ok/b": 1}}


async def test_seed_is_stored_on_the_app():
    assert create_app()[SEED] == 0
    assert create_app(seed=42)[SEED] == 42


async def stats(client) -> dict:
    async with client.get("/__stats") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_stats_report_load_and_hits(client):
    await client.get("/ok/a")
    await client.get("/status/500")
    assert await stats(client) == {
        "in_flight": 0,
        "max_in_flight": 1,
        "rejected": 0,
        "capacity": None,
        "hits": {"total": 2, "paths": {"/ok/a": 1, "/status/500": 1}},
    }


async def test_stats_show_requests_in_flight(client):
    slow = asyncio.create_task(client.get("/delay/300/a"))
    try:
        current = await wait_for_stats(client, lambda s: s["in_flight"] == 1)
        assert current["in_flight"] == 1
    finally:
        assert (await asyncio.wait_for(slow, 5)).status == 200
    assert (await stats(client))["in_flight"] == 0


async def test_stats_reset_clears_hits_and_rejections(aiohttp_client):
    client = await aiohttp_client(create_app(capacity=0), timeout=TIMEOUT)
    assert (await client.get("/ok")).status == 503
    resp = await client.post("/__stats/reset")
    assert resp.status == 200
    assert await resp.json() == {
        "in_flight": 0, "max_in_flight": 0, "rejected": 0, "capacity": 0,
        "hits": {"total": 0, "paths": {}},
    }  # fmt: skip


async def wait_for_stats(client, condition, within_s: float = 3.0) -> dict:
    """/__stats once `condition` holds for it, or after `within_s` (the caller then fails)."""
    deadline = time.monotonic() + within_s
    for _ in range(1000):
        current = await stats(client)
        if condition(current) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.01)
    return current


async def test_capacity_answers_503_at_once_beyond_n_requests_in_flight(aiohttp_client):
    client = await aiohttp_client(create_app(capacity=3), timeout=TIMEOUT)

    async def fetch(i: int) -> tuple[int, float]:
        started = time.monotonic()
        resp = await client.get(f"/capacity-delay/300/{i}")
        await resp.read()
        return resp.status, time.monotonic() - started

    tasks = [asyncio.create_task(fetch(i)) for i in range(8)]
    try:
        # The stats paths are never limited: they answer while the server is full.
        full = await wait_for_stats(client, lambda s: s["rejected"] == 5)
        assert (full["in_flight"], full["rejected"]) == (3, 5)
    finally:
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(status for status, _ in results) == [200] * 3 + [503] * 5
    # The 503s did not wait for a slot: each came back before any of the delayed 200s (the server
    # counted them rejected while its three slots were busy, above).
    assert max(e for status, e in results if status == 503) < min(e for status, e in results if status == 200)
    assert all(elapsed >= 0.3 for status, elapsed in results if status == 200)
    after = await stats(client)
    assert (after["in_flight"], after["max_in_flight"], after["rejected"]) == (0, 3, 5)
    assert after["capacity"] == 3
    assert after["hits"]["total"] == 8  # rejected requests are hits too
    assert client.server.app[LOAD].rejected == 5


async def test_capacity_zero_rejects_every_request_but_the_stats(aiohttp_client):
    client = await aiohttp_client(create_app(capacity=0), timeout=TIMEOUT)
    resp = await client.get("/ok")
    assert resp.status == 503
    assert await resp.text() == "over capacity\n"
    assert (await client.get("/__hits")).status == 200
    assert (await stats(client))["rejected"] == 1


def test_a_negative_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        create_app(capacity=-1)
    with pytest.raises(ValueError, match="capacity"):
        serve(port=0, capacity=-1)  # before listening anywhere


async def test_start_mock_server_serves_on_loopback_and_cleans_up():
    runner, url = await start_mock_server()
    try:
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{url}/ok/x") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/ok/x")


async def test_running_mock_server_yields_the_base_url():
    async with running_mock_server(seed=3, capacity=7) as url:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{url}/bytes/10") as resp:
                assert await resp.read() == bytes(range(10))
            async with session.get(f"{url}/__stats") as resp:
                assert (await resp.json())["capacity"] == 7
            async with session.get(f"{url}/random/a") as resp:
                assert resp.status == random_outcome(3, "/random/a")[0]


async def listening(runner: web.AppRunner) -> int:
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner.addresses[0][1]


async def exchange(port: int, head: str) -> bytes:
    """The server's whole answer to one request written as is, its Date header left out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return b"".join(line for line in answer.splitlines(keepends=True) if not line.startswith(b"Date: "))


# Request targets that a plain match and aiohttp's router could read differently: a load path or
# a near miss of one, then a tail of pieces.
TARGET_HEADS = ["ok", "okay", "o%6B", "delay/0", "delay/1", "delay/00002", "delay/60001", "delay/99999",
                "delay/-1", "delay/1.5", "delay/x", "delay", "status/204", "", "."]  # fmt: skip
TARGET_PIECES = ["", ".", "..", ".x", "x.", "a-b_c~", "ok", "%2F", "%2e%2e", "%41", "x?y=1", "?", "#"]


@settings(max_examples=150, deadline=None)
@given(
    head=st.sampled_from(TARGET_HEADS),
    tail=st.lists(st.sampled_from(TARGET_PIECES), max_size=3),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]),
    expect_continue=st.booleans(),
)
async def test_the_served_app_answers_and_counts_every_target_as_the_router_does(head, tail, method, expect_continue):
    target = "/" + head + "".join("/" + piece for piece in tail)
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n"
        + ("Expect: 100-continue\r\n" if expect_continue else "")
        + "Content-Length: 0\r\n\r\n"
    )
    served, routed = await serving_runner(create_app()), web.AppRunner(create_app())
    await routed.setup()
    try:
        served_port, routed_port = await listening(served), await listening(routed)
        assert await exchange(served_port, request) == await exchange(routed_port, request)
        hits = "GET /__hits HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n"
        assert await exchange(served_port, hits) == await exchange(routed_port, hits)
    finally:
        await served.cleanup()
        await routed.cleanup()


async def test_the_served_app_answers_plain_load_targets_without_routing_them():
    app, routed = create_app(), []

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        routed.append(request.raw_path)  # only a routed request has an app to signal

    app.on_response_prepare.append(on_prepare)
    runner = await serving_runner(app)
    try:
        base = f"http://127.0.0.1:{await listening(runner)}"
        plain = ["/ok", "/ok/1", "/ok/a/../b.c", "/ok/%41", "/delay/0/x", "/delay/00002"]
        routed_anyway = ["/o%6B", "/ok?x=1", "/delay/60001", "/status/200", "/okay"]
        async with aiohttp.ClientSession(base, timeout=TIMEOUT) as client:
            for target in plain + routed_anyway:
                async with client.get(URL(target, encoded=True)) as resp:
                    await resp.read()
            async with client.head("/ok/h") as resp:
                assert resp.status == 200
            current = await stats(client)
        assert routed == routed_anyway + ["/__stats"]
        assert current["hits"]["total"] == len(plain) + len(routed_anyway) + 1
        assert (current["max_in_flight"], current["in_flight"]) == (1, 0)
    finally:
        await runner.cleanup()


async def test_the_served_app_limits_plain_load_targets_by_capacity():
    runner = await serving_runner(create_app(capacity=1))
    try:
        base = f"http://127.0.0.1:{await listening(runner)}"
        async with aiohttp.ClientSession(base, timeout=TIMEOUT) as client:
            slow = asyncio.create_task(client.get("/delay/300/a"))
            await wait_for_stats(client, lambda current: current["in_flight"] == 1)
            async with client.get("/ok/b") as resp:
                assert (resp.status, await resp.text()) == (503, "over capacity\n")
            async with await slow as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
            current = await stats(client)
        assert (current["rejected"], current["in_flight"], current["hits"]["total"]) == (1, 0, 2)
    finally:
        await runner.cleanup()


def kill_tree(proc: psutil.Process) -> None:
    """Last resort so a failing test leaves nothing behind; by pid, never by name."""
    try:
        tree = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize(("processes", "stop_signal"), [(2, signal.SIGTERM), (1, signal.SIGINT)])
async def test_serve_in_a_subprocess_answers_then_stops_on_a_signal(processes, stop_signal):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.mock.server", "--port", "0",
        "--processes", str(processes),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    server = psutil.Process(proc.pid)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        noun = "process" if processes == 1 else "processes"
        assert line.startswith("mock server listening on http://127.0.0.1:")
        assert line.endswith(f" ({processes} {noun})\n")
        url = line.split()[4]

        children = server.children(recursive=True)
        servers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(servers) == (processes if processes > 1 else 0)

        # A fresh connection per request so that the kernel spreads them over the processes.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:

            async def fetch(i: int) -> int:
                async with session.get(f"{url}/ok/{i}") as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(fetch(i) for i in range(50)))
        assert statuses == [200] * 50

        proc.send_signal(stop_signal)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
        assert await proc.stdout.read() == b""  # nothing printed but the listening line
    finally:
        if proc.returncode is None:
            kill_tree(server)
            await asyncio.wait_for(proc.wait(), 10)


async def test_the_cli_takes_seed_and_capacity_and_misbehaves_the_same_under_uvloop():
    # The CLI serves with uvloop, whose transports differ from asyncio's: reset and hang-ups
    # must work there too, quietly.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.mock.server", "--port", "0", "--seed", "5", "--capacity", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.split()[4]
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{url}/__stats") as resp:
                assert (await resp.json())["capacity"] == 2
            for i in range(5):
                async with session.get(f"{url}/random/{i}") as resp:
                    assert resp.status == random_outcome(5, f"/random/{i}")[0]
            with pytest.raises(aiohttp.ClientOSError) as caught:
                await session.post(f"{url}/reset")
            assert caught.value.errno == errno.ECONNRESET
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await session.post(f"{url}/close")
            with pytest.raises(aiohttp.ClientResponseError):
                await session.get(f"{url}/garbage")
            async with session.get(f"{url}/endless") as resp:
                await resp.content.readexactly(1 << 20)
                resp.close()
            for _ in range(300):
                async with session.get(f"{url}/__stats") as resp:
                    if (await resp.json())["in_flight"] == 0:
                        break
                await asyncio.sleep(0.01)
            async with session.get(f"{url}/__stats") as resp:
                assert (await resp.json())["in_flight"] == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stderr.read() == b""  # nothing logged by the misbehaviours
    finally:
        if proc.returncode is None:
            kill_tree(psutil.Process(proc.pid))
            await asyncio.wait_for(proc.wait(), 10)


async def test_without_path_counts_the_total_still_counts_and_flaky_paths_still_recover(aiohttp_client):
    client = await aiohttp_client(create_app(count_paths=False), timeout=TIMEOUT)
    for i in range(5):
        assert (await client.get(f"/ok/{i}")).status == 200
    assert [(await client.get("/flaky/1/a")).status for _ in range(3)] == [503, 200, 200]
    assert await (await client.get("/__hits")).json() == {"total": 8, "paths": {"/flaky/1/a": 3}}
    assert client.server.app[LOAD].unlisted_hits == 5
    resp = await client.post("/__stats/reset")
    assert (await resp.json())["hits"] == {"total": 0, "paths": {}}
    assert (await client.get("/flaky/1/a")).status == 503  # counted afresh


async def test_the_cli_can_turn_path_counts_off():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.mock.server", "--port", "0", "--no-path-hits",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()[4]
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for i in range(3):
                async with session.get(f"{url}/ok/{i}") as resp:
                    assert resp.status == 200
            async with session.get(f"{url}/__hits") as resp:
                assert await resp.json() == {"total": 3, "paths": {}}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            kill_tree(psutil.Process(proc.pid))
            await asyncio.wait_for(proc.wait(), 10)


def test_both_ways_of_starting_the_mock_server_take_the_same_flags() -> None:
    """`crawler mock-server` and `python -m crawler.mock.server` read one declaration of the flags:
    the same option strings, defaults and help."""
    import argparse

    from crawler.cli import build_parser
    from crawler.mock.options import add_server_flags

    cli = build_parser()
    [sub] = [a for a in cli._actions if isinstance(a, argparse._SubParsersAction)]
    module = argparse.ArgumentParser()
    add_server_flags(module)

    def flags(parser: argparse.ArgumentParser) -> dict:
        return {tuple(a.option_strings): (a.dest, a.default, a.help) for a in parser._actions if a.dest != "help"}

    assert flags(sub.choices["mock-server"]) == flags(module)
    assert ("--report",) in flags(module) and ("--ca-out",) in flags(module)
