"""The ResultWriter against an in-memory ledger (tests/fake_ledger.py): its outage path (writes
failing while the database is away, then passing; past the outage limit, the clear error), its
backpressure, and its graceful close and immediate terminate. tests/test_poisoned_writes.py holds
it against PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from crawler.errors import DatabaseError
from crawler.fetch.writer import ResultWriter
from crawler.ledger.chunks import Lease
from crawler.ledger.results import ResultRow
from fake_ledger import FakeStore

DEADLINE = 60.0  # seconds a condition may take on a loaded machine before the test fails


def result(job_id: int, row_no: int) -> ResultRow:
    return ResultRow(job_id, row_no, 200, f"http://a.test/{row_no}", None, None, 1, False, 1.0, 2, b"\x01" * 32, None)


def store_with_chunk(rows: int) -> tuple[FakeStore, Lease]:
    store = FakeStore()
    chunk_no = store.add_chunk([f"http://a.test/{i}" for i in range(rows)])
    chunk = store.chunks[chunk_no]
    chunk.state, chunk.fence, chunk.owner = "leased", 1, "me:1"
    return store, Lease(chunk_no, 1)


async def eventually(condition, what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_writes_that_fail_while_the_database_is_away_are_retried_once_it_is_back_nothing_lost_or_doubled():
    store, lease = store_with_chunk(50)
    store.failing_writes = 3
    writer = ResultWriter(store.ledger(), batch_size=10, interval=0.05, lease_seconds=60)
    async with asyncio.TaskGroup() as tg:
        writer.start(tg)
        for row in range(1, 51):
            await writer.room()
            writer.add(lease, result(store.job_id, row))
        writer.complete(lease)
        await writer.close()
    assert store.write_attempts > 3  # the outage was met, and outlasted
    assert store.committed == list(range(1, 51))  # once each, in the order they were handed over
    assert not store.doubled
    assert store.chunks[lease.chunk_no].state == "done"
    assert store.connections >= 4  # each outage dropped the connection; the retry made a new one
    assert not writer.lost


async def test_while_the_database_is_away_the_full_buffer_holds_fetching_back_and_drops_nothing():
    store, lease = store_with_chunk(100)
    store.writes_down = True
    writer = ResultWriter(store.ledger(), batch_size=2, interval=0.05, lease_seconds=60)
    assert writer.max_buffer == 16
    async with asyncio.TaskGroup() as tg:
        writer.start(tg)
        for row in range(1, 17):
            await writer.room()
            writer.add(lease, result(store.job_id, row))
        assert writer.full
        waiting = tg.create_task(writer.room())
        await eventually(lambda: store.write_attempts >= 2, "the writer tries again while the database is away")
        assert not waiting.done()  # no room while nothing can be written
        store.writes_down = False
        await asyncio.wait_for(waiting, DEADLINE)
        for row in range(17, 101):
            await writer.room()
            writer.add(lease, result(store.job_id, row))
        writer.complete(lease)
        await writer.close()
    assert store.committed == list(range(1, 101))
    assert not store.doubled


async def test_past_the_outage_limit_the_writer_stops_with_the_one_sentence_database_error():
    store, lease = store_with_chunk(5)
    store.writes_down = True
    writer = ResultWriter(store.ledger(outage_limit=0.3), batch_size=10, interval=0.05, lease_seconds=60)
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.TaskGroup() as tg:
            writer.start(tg)
            for row in range(1, 6):
                writer.add(lease, result(store.job_id, row))
            writer.complete(lease)
            await writer.close()
    error = caught.value.exceptions[0]
    assert isinstance(error, DatabaseError)
    assert "was unavailable for more than 0.3s" in str(error)
    assert "`crawler resume 1` finishes the job" in str(error)
    assert store.write_attempts > 1 and not store.committed
    assert store.chunks[lease.chunk_no].state == "leased"  # redone by whoever leases it next


async def test_results_refused_by_a_moved_fence_are_dropped_and_their_lease_reported_lost():
    store, lease = store_with_chunk(3)
    store.take_over(lease.chunk_no)
    writer = ResultWriter(store.ledger(), batch_size=10, interval=0.05, lease_seconds=60)
    for row in range(1, 4):
        writer.add(lease, result(store.job_id, row))
    writer.complete(lease)
    await writer.flush()
    assert writer.lost == {lease}
    assert not store.committed
    assert store.chunks[lease.chunk_no].owner == "elsewhere:1"


async def test_close_flushes_what_is_buffered_before_it_returns():
    store, lease = store_with_chunk(5)
    # An interval far longer than the test: only close() can have flushed.
    writer = ResultWriter(store.ledger(), batch_size=100, interval=3600, lease_seconds=60)
    async with asyncio.TaskGroup() as tg:
        writer.start(tg)
        for row in range(1, 6):
            writer.add(lease, result(store.job_id, row))
        await writer.close()
        assert store.committed == [1, 2, 3, 4, 5]


async def test_terminate_stops_a_writer_stuck_on_an_outage_at_once():
    store, lease = store_with_chunk(5)
    store.writes_down = True
    writer = ResultWriter(store.ledger(), batch_size=1, interval=0.05, lease_seconds=60)
    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tg:
        writer.start(tg)
        writer.add(lease, result(store.job_id, 1))
        await eventually(lambda: store.write_attempts >= 1, "the writer tries to write")
        writer.terminate()
    assert not store.committed  # what was buffered is the next lease holder's to redo


async def test_close_cancelled_while_it_waits_terminates_the_writer():
    store, lease = store_with_chunk(5)
    store.writes_down = True
    writer = ResultWriter(store.ledger(), batch_size=1, interval=0.05, lease_seconds=60)
    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tg:
        writer.start(tg)
        writer.add(lease, result(store.job_id, 1))
        closing = tg.create_task(writer.close())
        await eventually(lambda: store.write_attempts >= 1, "the writer tries to write")
        closing.cancel()
    assert closing.cancelled()
    assert writer._task is not None and writer._task.cancelled()


async def test_a_writer_started_twice_says_so():
    store, _ = store_with_chunk(1)
    writer = ResultWriter(store.ledger(), batch_size=1, interval=0.05, lease_seconds=60)
    async with asyncio.TaskGroup() as tg:
        writer.start(tg)
        with pytest.raises(Exception, match="started twice"):
            writer.start(tg)
        await writer.close()
