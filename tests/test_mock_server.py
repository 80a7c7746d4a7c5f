"""The mock server answers by path alone, counts hits, and its multi-process mode stops cleanly."""

import asyncio
import os
import signal
import sys
import time

import aiohttp
import psutil
import pytest

from crawler.mock_server import (
    CHUNK_SIZE,
    HITS,
    MAX_BYTES,
    SEED,
    create_app,
    running_mock_server,
    start_mock_server,
)

TIMEOUT = aiohttp.ClientTimeout(total=20)


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(), timeout=TIMEOUT)


def expected_bytes(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/ok", "/ok/", "/ok/a/b/c.html"])
async def test_ok_answers_200_plain_text(client, method, path):
    resp = await client.request(method, path, data=b"ignored" if method == "POST" else None)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "ok\n"


async def test_ok_head_has_no_body(client):
    resp = await client.head("/ok/x")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_unknown_path_is_404(client):
    assert (await client.get("/okay")).status == 404
    assert (await client.get("/nothing/here")).status == 404


@pytest.mark.parametrize("code", [200, 201, 301, 302, 400, 404, 418, 429, 500, 503, 599])
async def test_status_returns_the_code_asked_for(client, code):
    resp = await client.get(f"/status/{code}", allow_redirects=False)
    assert resp.status == code
    assert await resp.text() == f"{code}\n"


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body_codes_send_no_body(client, code):
    resp = await client.get(f"/status/{code}")
    assert resp.status == code
    assert await resp.read() == b""


@pytest.mark.parametrize("path", ["/status/99", "/status/600", "/status/-1", "/status/abc"])
async def test_status_rejects_bad_codes_with_400(client, path):
    resp = await client.get(path)
    assert resp.status == 400


async def test_delay_waits_at_least_the_time_asked_for(client):
    started = time.monotonic()
    resp = await client.get("/delay/300/some/page")
    assert resp.status == 200
    assert await resp.text() == "ok\n"
    assert time.monotonic() - started >= 0.3


async def test_delay_without_a_tail_and_of_zero_answers_at_once(client):
    assert (await client.get("/delay/0")).status == 200


@pytest.mark.parametrize("path", ["/delay/abc/x", "/delay/-5/x", "/delay/60001/x"])
async def test_delay_rejects_bad_durations_with_400(client, path):
    assert (await client.get(path)).status == 400


@pytest.mark.parametrize("n", [0, 1, 255, 256, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 300_000])
async def test_bytes_returns_exactly_n_deterministic_bytes(client, n):
    resp = await client.get(f"/bytes/{n}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(n)
    assert "Transfer-Encoding" not in resp.headers
    body = await resp.read()
    assert body == expected_bytes(n)


async def test_bytes_large_body_streams_the_exact_length(client):
    n = 64 * 1024 * 1024 + 7
    resp = await client.get(f"/bytes/{n}")
    assert resp.headers["Content-Length"] == str(n)
    received = 0
    tail = b""
    async for chunk in resp.content.iter_chunked(1 << 20):
        received += len(chunk)
        tail = (tail + chunk)[-256:]
    assert received == n
    assert tail == bytes((n - 256 + i) % 256 for i in range(256))


async def test_bytes_head_sends_length_but_no_body(client):
    resp = await client.head("/bytes/100000")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "100000"
    assert await resp.read() == b""


@pytest.mark.parametrize("path", [f"/bytes/{MAX_BYTES + 1}", "/bytes/-1", "/bytes/ten"])
async def test_bytes_rejects_bad_sizes_with_400(client, path):
    assert (await client.get(path)).status == 400


@pytest.mark.parametrize("n", [0, 1, 5])
async def test_redirect_chain_ends_in_200_after_n_hops(client, n):
    resp = await client.get(f"/redirect/{n}")
    assert resp.status == 200
    assert len(resp.history) == n
    assert all(hop.status == 302 for hop in resp.history)
    assert resp.url.path == "/redirect/0"


async def test_redirect_points_to_the_next_hop(client):
    resp = await client.get("/redirect/3", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/redirect/2"


@pytest.mark.parametrize("path", ["/redirect/-1", "/redirect/x"])
async def test_redirect_rejects_bad_counts_with_400(client, path):
    assert (await client.get(path)).status == 400


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
    async with running_mock_server(seed=3) as url:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{url}/bytes/10") as resp:
                assert await resp.read() == expected_bytes(10)


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
        sys.executable, "-m", "crawler.mock_server", "--port", "0",
        "--processes", str(processes),
        stdout=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
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
