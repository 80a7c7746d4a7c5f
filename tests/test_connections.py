"""The worker's connections, counted where they end: on raw asyncio servers on loopback. A host
with nothing pending gives its idle connections back at once, a host still busy keeps them for
reuse, and idle connections are kept to only so many hosts."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import test_settings
from crawler.fetch.fetcher import Fetcher
from crawler.fetch.hosts import HostScheduler, host_of

pytestmark = pytest.mark.one_server


class CountingServer(asyncio.Protocol):
    """Answers HTTP/1.1 keep-alive requests with 'ok'; /hold/.. waits for `released`. The
    factory (Server below) counts connections opened and closed, as the server sees them."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            self.server.requests.append(path.decode())
            if path.startswith(b"/hold/"):
                asyncio.ensure_future(self._answer_when_released())
            else:
                self._answer()

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def _answer_when_released(self) -> None:
        await self.server.released.wait()
        self._answer()


class Server:
    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.requests: list[str] = []
        self.released = asyncio.Event()
        self.url = ""

    @property
    def open(self) -> int:
        return self.opened - self.closed

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: CountingServer(self), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.released.set()
        self._server.close()


async def wait_for(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.01)


async def crawl_with_scheduler(fetcher: Fetcher, scheduler: HostScheduler, urls: list[str], tasks: int) -> None:
    """What the worker does, reduced to the fetch pool and the scheduler."""
    remaining = len(urls)
    finished = asyncio.Event()

    async def fetch_loop() -> None:
        nonlocal remaining
        while True:
            url = await scheduler.ready.get()
            attempt = await fetcher.attempt("GET", url)
            assert attempt.status == 200, attempt.error
            scheduler.done(url, error_kind=attempt.error_kind, status=attempt.status, elapsed=0.01)
            remaining -= 1
            if remaining == 0:
                finished.set()

    pool = [asyncio.ensure_future(fetch_loop()) for _ in range(tasks)]
    try:
        for url in urls:
            scheduler.put(url)
        await finished.wait()
    finally:
        for task in pool:
            task.cancel()
        await asyncio.gather(*pool, return_exceptions=True)


def scheduler_for(fetcher: Fetcher, per_host: int) -> HostScheduler:
    return HostScheduler(initial=per_host, maximum=per_host, adaptive=False, key=host_of, on_idle=fetcher.release_host)


async def test_a_host_with_nothing_pending_has_its_connections_closed_while_a_busy_host_keeps_its_own():
    async with Server() as done_host, Server() as busy_host, Fetcher(test_settings(concurrency=8)) as fetcher:
        scheduler = scheduler_for(fetcher, per_host=3)
        work = asyncio.ensure_future(
            crawl_with_scheduler(
                fetcher,
                scheduler,
                [f"{done_host.url}/ok/{i}" for i in range(6)]
                + [f"{busy_host.url}/hold/0"]
                + [f"{busy_host.url}/ok/{i}" for i in range(5)],
                tasks=8,
            )
        )
        # The first host's six requests are answered: it has nothing pending, so its connections
        # are closed at once (not after aiohttp's 15 s keep-alive).
        await wait_for(
            lambda: len(done_host.requests) == 6 and done_host.opened > 0 and done_host.open == 0,
            "the finished host's connections being closed",
        )
        # The busy host still has a request in flight: its idle connections wait for more work.
        await wait_for(lambda: len(busy_host.requests) == 6, "the busy host's requests arriving")
        assert busy_host.closed == 0 and busy_host.open == busy_host.opened == 3
        busy_host.released.set()
        await work
        await wait_for(lambda: busy_host.open == 0, "the busy host's connections being closed once it is done")
    assert fetcher.connector is None


async def test_a_single_busy_host_reuses_one_connection():
    async with Server() as host, Fetcher(test_settings(concurrency=4)) as fetcher:
        scheduler = scheduler_for(fetcher, per_host=1)
        await crawl_with_scheduler(fetcher, scheduler, [f"{host.url}/ok/{i}" for i in range(40)], tasks=4)
        assert len(host.requests) == 40
        assert host.opened == 1  # kept alive from the first request to the last
        await wait_for(lambda: host.open == 0, "the connection being closed when the host is done")


@pytest.mark.parametrize("idle_hosts, concurrency, keep", [(3, 8, 3), (5, 1, 5), (0, 1, 2), (0, 2, 4)])
async def test_idle_connections_are_kept_to_only_so_many_hosts(idle_hosts, concurrency, keep):
    """The hosts idle longest lose their connections beyond `idle_hosts` hosts; with 0 (the
    scheduler closes a host's at once), beyond 2 x concurrency hosts the scheduler never sees
    (e.g. a redirect's target)."""
    servers = [Server() for _ in range(keep + 3)]
    for server in servers:
        await server.__aenter__()
    try:
        async with Fetcher(test_settings(concurrency=concurrency, idle_hosts=idle_hosts)) as fetcher:
            for server in servers:
                attempt = await fetcher.attempt("GET", f"{server.url}/ok/1")
                assert attempt.status == 200
            await wait_for(lambda: sum(s.open for s in servers) == keep, f"{keep} hosts keeping a connection")
            assert [s.open for s in servers] == [0, 0, 0] + [1] * keep  # the oldest went first
    finally:
        for server in servers:
            await server.__aexit__()
