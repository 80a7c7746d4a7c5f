"""A Worker given an in-memory ledger (tests/fake_ledger.py) and a real Fetcher against a loopback
server: a small job start to end, the drain, a lease lost to another worker, and the database
going away under the writer. The end-to-end tests (test_crawl, test_faults, test_signals) hold
the same behaviours through whole crawls on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from conftest import test_settings
from crawler.errors import DatabaseError
from crawler.fetch.fetcher import Fetcher
from crawler.fetch.process import _first_crawler_error
from crawler.fetch.worker import Worker, host_scheduler
from crawler.fetch.worker_ledger import LedgerAccess, WorkerLedger
from crawler.fetch.writer import ResultWriter
from crawler.ledger.chunks import Lease
from crawler.settings import Settings
from crawler.states import ChunkState
from fake_ledger import FakeLedger, FakeStore

DEADLINE = 60.0  # seconds a condition may take on a loaded machine before the test fails


class Site:
    """A loopback server: /fast/* answers at once, /slow/* once `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[str] = []
        self.slow_waiting = 0

    async def fast(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.Response(text="ok")

    async def slow(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        self.slow_waiting += 1
        try:
            await self.release.wait()
        finally:
            self.slow_waiting -= 1
        return web.Response(text="late")


@pytest.fixture
async def site(aiohttp_server):
    site = Site()
    app = web.Application()
    app.router.add_get("/fast/{n}", site.fast)
    app.router.add_get("/slow/{n}", site.slow)
    server = await aiohttp_server(app)
    site.base = f"http://127.0.0.1:{server.port}"
    yield site
    site.release.set()  # a handler still waiting ends with the server


def settings(**overrides) -> Settings:
    values = dict(workers=1, concurrency=2, write_interval=0.05, heartbeat_seconds=0.05, drain_grace=30.0)
    values.update(overrides)
    return test_settings(**values)


@contextlib.asynccontextmanager
async def worker_on(store: FakeStore, s: Settings, *, outage_limit: float = 300.0) -> AsyncIterator[Worker]:
    """What open_worker wires, with the in-memory ledger for the three connections."""
    async with Fetcher(s) as fetcher:
        writer = ResultWriter(
            store.ledger(outage_limit),
            batch_size=s.write_batch,
            interval=s.write_interval,
            lease_seconds=s.lease_seconds,
        )
        yield Worker(
            s,
            store.job_id,
            ledger=store.ledger(outage_limit),
            beat=store.ledger(outage_limit),
            writer=writer,
            fetcher=fetcher,
            hosts=host_scheduler(s),
        )


async def eventually(condition, what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {DEADLINE:g}s: {what}") from None


def drain_began(worker: Worker) -> bool:
    """Rows not started were dropped and the fetch tasks told to end: only their Nones are queued."""
    queued = list(worker.hosts.ready._queue)  # type: ignore[attr-defined]
    return worker.stop.is_set() and bool(queued) and all(item is None for item in queued)


async def test_a_worker_fetches_its_chunks_and_commits_each_with_its_results(site):
    store = FakeStore()
    for chunk in range(2):
        store.add_chunk([f"{site.base}/fast/{chunk}-{i}" for i in range(5)])
    async with worker_on(store, settings()) as worker:
        stats = await asyncio.wait_for(worker.run(), DEADLINE)
    assert sorted(store.committed) == list(range(1, 11)) and not store.doubled
    assert {r.status for r in store.results.values()} == {200}
    assert {r.final_url for r in store.results.values()} == {store.requests[n]["url"] for n in range(1, 11)}
    assert all(chunk.state == ChunkState.DONE for chunk in store.chunks.values())
    assert (stats.chunks, stats.fetched, stats.lost_leases) == (2, 10, 0)
    registered = store.workers[worker.id]
    assert (registered["fetched"], registered["stopped"]) == (10, True)
    assert len(site.seen) == 10


async def test_a_drain_writes_what_finished_within_the_grace_and_gives_the_unfinished_chunk_back(site):
    store = FakeStore()
    urls = [f"{site.base}/fast/{i}" for i in (1, 2)] + [f"{site.base}/slow/{i}" for i in (3, 4, 5, 6)]
    chunk_no = store.add_chunk(urls)
    async with worker_on(store, settings()) as worker:
        running = asyncio.create_task(worker.run())
        await eventually(
            lambda: site.slow_waiting == 2 and store.committed == [1, 2], "rows 1-2 written and rows 3-4 in flight"
        )
        worker.stop.set()
        await eventually(lambda: drain_began(worker), "the drain drops the rows not started")
        site.release.set()  # the requests in flight end within the grace
        stats = await asyncio.wait_for(running, DEADLINE)
    assert sorted(store.committed) == [1, 2, 3, 4] and not store.doubled
    assert sorted(site.seen) == sorted(u.removeprefix(site.base) for u in urls[:4])  # rows 5-6 never sent
    chunk = store.chunks[chunk_no]
    assert (chunk.state, chunk.owner, chunk.fence) == (ChunkState.PENDING, None, 1)  # given back, for anyone
    assert stats.fetched == 4
    assert store.workers[worker.id]["stopped"]


async def test_a_drain_past_its_grace_abandons_the_requests_in_flight_and_gives_the_chunk_back(site):
    store = FakeStore()
    chunk_no = store.add_chunk([f"{site.base}/fast/1"] + [f"{site.base}/slow/{i}" for i in (2, 3, 4)])
    async with worker_on(store, settings(drain_grace=0.2)) as worker:
        running = asyncio.create_task(worker.run())
        await eventually(lambda: site.slow_waiting == 2 and store.committed == [1], "row 1 written, 2-3 in flight")
        worker.stop.set()
        stats = await asyncio.wait_for(running, DEADLINE)  # the server never answers rows 2-3
    assert store.committed == [1]
    assert store.chunks[chunk_no].state == ChunkState.PENDING
    assert stats.fetched == 1


async def test_a_lease_lost_to_another_worker_is_noticed_by_the_heartbeat_and_its_rows_are_dropped(site):
    store = FakeStore()
    chunk_no = store.add_chunk([f"{site.base}/slow/{i}" for i in range(4)])
    async with worker_on(store, settings(concurrency=1)) as worker:
        running = asyncio.create_task(worker.run())
        await eventually(lambda: site.slow_waiting == 1, "the first row in flight")
        store.take_over(chunk_no)  # our lease expired and another worker leased the chunk
        await eventually(lambda: Lease(chunk_no, 1) in worker._lost, "the heartbeat notices the lease is gone")
        site.release.set()
        await eventually(lambda: Lease(chunk_no, 1) in worker.writer.lost, "the late result is refused")
        store.chunks[chunk_no].state = ChunkState.DONE  # the other worker finishes it
        stats = await asyncio.wait_for(running, DEADLINE)
    assert len(site.seen) == 1  # the rows not yet started were dropped, not fetched
    assert not store.committed
    assert store.chunks[chunk_no].owner == "elsewhere:1"  # not given back: it was not ours
    assert stats.lost_leases == 1
    assert not store.renewals[-1]


async def test_a_database_outage_under_the_writer_pauses_writing_and_loses_nothing(site):
    store = FakeStore()
    for chunk in range(3):
        store.add_chunk([f"{site.base}/fast/{chunk}-{i}" for i in range(4)])
    store.failing_writes = 3
    async with worker_on(store, settings(write_batch=2)) as worker:
        stats = await asyncio.wait_for(worker.run(), DEADLINE)
    assert store.write_attempts > 3
    assert sorted(store.committed) == list(range(1, 13)) and not store.doubled
    assert all(chunk.state == ChunkState.DONE for chunk in store.chunks.values())
    assert stats.fetched == 12


async def test_past_the_outage_limit_the_worker_stops_with_the_database_error_and_keeps_its_chunk(site):
    store = FakeStore()
    chunk_no = store.add_chunk([f"{site.base}/fast/{i}" for i in range(4)])
    store.writes_down = True
    async with worker_on(store, settings(), outage_limit=0.5) as worker:
        with pytest.raises(BaseExceptionGroup) as caught:
            await asyncio.wait_for(worker.run(), DEADLINE)
    error = _first_crawler_error(caught.value)
    assert isinstance(error, DatabaseError)
    assert str(error).startswith("PostgreSQL at postgresql://fake/ledger was unavailable for more than 0.5s")
    assert error.exit_code == DatabaseError.exit_code
    assert not store.committed
    # Not given back (the ledger is away): its lease expires and whoever leases it next redoes it.
    assert store.chunks[chunk_no].state == ChunkState.LEASED


def test_the_fake_ledger_and_the_real_one_answer_every_call_a_worker_makes_with_its_parameters():
    """The in-memory ledger stands for the real one only while both have WorkerLedger's calls."""
    calls = {name for name, value in vars(WorkerLedger).items() if inspect.iscoroutinefunction(value)}
    assert "write_results" in calls and len(calls) >= 10
    for implementation in (LedgerAccess, FakeLedger):
        for name in calls:
            wanted = list(inspect.signature(getattr(WorkerLedger, name)).parameters)
            assert list(inspect.signature(getattr(implementation, name)).parameters) == wanted, (implementation, name)
