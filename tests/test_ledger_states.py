"""The ledger's leases and results as a state machine, against a real PostgreSQL: two workers
lease, renew, release, write (also stale and replayed batches) and complete chunks in any order,
leases expire under them, and the job is finished; a model says what the ledger must hold after
every step. Invariants: no stale write lands, every row ends with exactly one result, and each
chunk's counters match its results."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from crawler.job.inputs import RequestRow
from crawler.ledger.chunks import (
    Lease,
    chunk_requests,
    lease_chunk,
    mark_ingested,
    release_chunk,
    renew_leases,
    store_chunk,
)
from crawler.ledger.jobs import create_job
from crawler.ledger.migrate import apply_migrations
from crawler.ledger.results import ResultRow, finish_job, prepare_writer, write_results
from crawler.states import ChunkState, JobState
from crawler.urls import fingerprint

WORKERS = ("host:1", "host:2")
# Three chunks of four rows; row 12 repeats row 1, so finish_job has a duplicate to fill in.
CHUNKS = [[f"http://a.test/{n}" for n in range(first, first + 4)] for first in (1, 5, 9)]
CHUNKS[2][3] = CHUNKS[0][0]
ROWS = sum(len(c) for c in CHUNKS)
LEASE_SECONDS = 60.0
DRAIN_AFTER = 15  # steps of any kind before the job may be driven to its end


class Holding:
    """What one worker believes it holds: a lease and the rows it was given to fetch, which it
    writes in batches; the lease may have been lost without the worker knowing."""

    def __init__(self, owner: str, lease: Lease, todo: list[int]) -> None:
        self.owner, self.lease, self.todo = owner, lease, todo
        self.written: list[int] = []
        self.last_batch: list[int] = []

    def __repr__(self) -> str:
        return f"Holding({self.owner}, {self.lease}, todo={self.todo}, written={self.written})"


def record(job_id: int, row: int, tag: str) -> ResultRow:
    """A result whose final_url names the lease that wrote it; even rows failed."""
    failed = row % 2 == 0
    return ResultRow(
        job_id,
        row,
        None if failed else 200,
        tag,
        "timeout" if failed else None,
        "timed out" if failed else None,
        1,
        False,
        1.0,
        0,
        b"",
        None,
    )


class LedgerStates(RuleBasedStateMachine):
    dsn: str  # set by the test

    holdings = Bundle("holdings")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conns = {w: self.run(asyncpg.connect(self.dsn)) for w in WORKERS}
        self.admin = self.run(asyncpg.connect(self.dsn))
        self.job = self.run(create_job(self.admin, name=None, input="states", settings={}))
        first_row = 1
        for chunk_no, urls in enumerate(CHUNKS):
            rows = [RequestRow(first_row + i, "GET", u, fingerprint("GET", u)) for i, u in enumerate(urls)]
            self.run(store_chunk(self.admin, self.job.id, chunk_no, rows))
            first_row += len(urls)
        self.run(mark_ingested(self.admin, self.job.id))
        self.run(prepare_writer(self.conns[WORKERS[0]]))
        self.run(prepare_writer(self.conns[WORKERS[1]]))
        # The model: per chunk its state, fence and whether its lease has expired; per row its result's tag.
        self.state = {n: "pending" for n in range(len(CHUNKS))}
        self.fence = {n: 0 for n in range(len(CHUNKS))}
        self.expired = {n: False for n in range(len(CHUNKS))}
        self.results: dict[int, str] = {}
        self.finished = False  # finish_job said so
        self.steps = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        # terminate, not close: after a failed step a connection may still be mid-statement.
        for conn in [*self.conns.values(), self.admin]:
            conn.terminate()
        self.loop.close()

    # --- the model's view of a lease ----------------------------------------------------------

    def current(self, lease: Lease) -> bool:
        return self.state[lease.chunk_no] == "leased" and self.fence[lease.chunk_no] == lease.fence

    def leasable(self) -> list[int]:
        return [n for n in self.state if self.state[n] == "pending" or (self.state[n] == "leased" and self.expired[n])]

    def rows_to_fetch(self, chunk_no: int) -> list[int]:
        first = sum(len(c) for c in CHUNKS[:chunk_no]) + 1
        return [r for r in range(first, first + len(CHUNKS[chunk_no])) if r != ROWS]  # row 12 is a duplicate

    # --- rules --------------------------------------------------------------------------------

    @rule(target=holdings, worker=st.sampled_from(WORKERS))
    def lease(self, worker: str):
        expected = min(self.leasable(), default=None)
        got = self.run(lease_chunk(self.conns[worker], self.job.id, worker, LEASE_SECONDS))
        if expected is None:
            assert got is None
            return multiple()  # nothing leased: no holding
        assert got is not None and got.lease == Lease(expected, self.fence[expected] + 1), (got, expected)
        self.state[expected], self.fence[expected], self.expired[expected] = "leased", got.lease.fence, False
        todo = [r["row_no"] for r in self.run(chunk_requests(self.conns[worker], self.job.id, got))]
        assert todo == [r for r in self.rows_to_fetch(expected) if r not in self.results]
        return Holding(worker, got.lease, todo)

    @rule(chunk_no=st.integers(0, len(CHUNKS) - 1))
    def expire(self, chunk_no: int):
        """The holder went silent past its lease (moved into the past rather than waited for)."""
        self.run(
            self.admin.execute(
                "UPDATE chunks SET lease_expires = now() - interval '1 second'"
                " WHERE job_id = $1 AND chunk_no = $2 AND state = 'leased'",
                self.job.id,
                chunk_no,
            )
        )
        if self.state[chunk_no] == "leased":
            self.expired[chunk_no] = True

    @rule(holding=holdings)
    def renew(self, holding: Holding):
        kept = self.run(renew_leases(self.conns[holding.owner], self.job.id, [holding.lease], LEASE_SECONDS))
        assert kept == ({holding.lease.chunk_no} if self.current(holding.lease) else set())
        if kept:
            self.expired[holding.lease.chunk_no] = False

    @rule(holding=holdings, size=st.integers(1, 4))
    def write(self, holding: Holding, size: int):
        batch = [r for r in holding.todo if r not in holding.written][:size]
        self.commit(holding, batch, complete=False)

    @rule(holding=holdings)
    def replay(self, holding: Holding):
        """The last batch again, as after a connection lost before its COMMIT's answer was read."""
        self.commit(holding, holding.last_batch, complete=False)

    @rule(holding=holdings)
    def complete(self, holding: Holding):
        """The rest of the lease's rows, and the chunk completed, in one write."""
        rest = [r for r in holding.todo if r not in holding.written]
        self.commit(holding, rest, complete=True)

    @rule(holding=consumes(holdings))
    def release(self, holding: Holding):
        self.run(release_chunk(self.conns[holding.owner], self.job.id, holding.lease))
        if self.current(holding.lease):
            self.state[holding.lease.chunk_no] = "pending"
            self.expired[holding.lease.chunk_no] = False

    @rule()
    def finish(self):
        done = self.run(finish_job(self.admin, self.job.id))
        assert done == all(s == "done" for s in self.state.values())
        if done:
            self.finished = True
            self.assert_every_row_has_one_result()

    def commit(self, holding: Holding, batch: list[int], *, complete: bool) -> None:
        tag = f"{holding.owner}#{holding.lease.chunk_no}.{holding.lease.fence}"
        records = [record(self.job.id, r, tag) for r in batch]
        if not records and not complete:
            return  # a worker with nothing to say sends nothing
        refused = self.run(
            write_results(
                self.conns[holding.owner],
                self.job.id,
                {holding.lease: records} if records else {},
                {holding.lease} if complete else set(),
                LEASE_SECONDS,
            )
        )
        if not self.current(holding.lease):
            assert refused == {holding.lease}
            return
        assert refused == set()
        for r in batch:
            self.results.setdefault(r, tag)  # a replayed row keeps its first write
        holding.written += [r for r in batch if r not in holding.written]
        holding.last_batch = batch
        self.expired[holding.lease.chunk_no] = False  # a write renews the lease
        if complete:
            self.state[holding.lease.chunk_no] = "done"

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def the_ledger_holds_what_the_model_says(self):
        self.steps += 1
        chunks = self.run(
            self.admin.fetch(
                "SELECT chunk_no, state, fence, fetch_rows, done_rows, ok_rows, failed_rows, first_row, last_row"
                " FROM chunks WHERE job_id = $1 ORDER BY chunk_no",
                self.job.id,
            )
        )
        results = dict(
            self.run(
                self.admin.fetch(
                    "SELECT row_no, final_url FROM results WHERE job_id = $1 AND cache_kind IS NULL", self.job.id
                )
            )
        )
        # No stale write landed: every result is the one the model let through, from a current lease.
        assert results == self.results
        for c in chunks:
            n = c["chunk_no"]
            assert (c["state"], c["fence"]) == (self.state[n], self.fence[n])
            mine = [r for r in self.rows_to_fetch(n) if r in results]
            assert c["fetch_rows"] == len(self.rows_to_fetch(n))
            assert c["done_rows"] == len(mine), (c, mine)
            assert c["ok_rows"] == sum(1 for r in mine if r % 2)
            assert c["failed_rows"] == sum(1 for r in mine if not r % 2)

    @precondition(lambda self: self.steps >= DRAIN_AFTER and not self.finished)
    @rule()
    def drain_to_the_end(self) -> None:
        """Whatever state the steps left: leases run out, one worker finishes every chunk, and
        the job ends with exactly one result per row."""
        for n in self.state:
            self.expire(n)
        while self.leasable():
            holding = self.lease(WORKERS[0])
            self.complete(holding)
            self.the_ledger_holds_what_the_model_says()
        self.finish()
        assert self.finished

    def assert_every_row_has_one_result(self) -> None:
        rows = self.run(
            self.admin.fetch(
                "SELECT row_no, count(*) OVER (PARTITION BY row_no) AS n, status, error_kind, cache_kind"
                " FROM results WHERE job_id = $1 ORDER BY row_no",
                self.job.id,
            )
        )
        assert [r["row_no"] for r in rows] == list(range(1, ROWS + 1))
        assert all(r["n"] == 1 for r in rows)
        duplicate, original = rows[ROWS - 1], rows[0]
        assert duplicate["cache_kind"] == "duplicate"
        assert (duplicate["status"], duplicate["error_kind"]) == (original["status"], original["error_kind"])


@pytest.fixture
def states_dsn(fresh_dsn) -> str:
    async def migrate() -> None:
        conn = await asyncpg.connect(fresh_dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    return fresh_dsn


def test_leases_and_results_in_any_order_keep_the_ledger_consistent(states_dsn):
    LedgerStates.dsn = states_dsn
    # Modest: each example is a new job and a few dozen statements (a few seconds in all).
    run_state_machine_as_test(
        LedgerStates,
        settings=settings(
            max_examples=25,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


async def allowed_states(db, table: str) -> set[str]:
    """The values the table's CHECK constraint on `state` allows."""
    definitions = await db.fetch(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'",
        table,
    )
    [state] = [d["def"] for d in definitions if "state" in d["def"]]
    return set(re.findall(r"'([a-z_]+)'", state))


@pytest.mark.parametrize(("table", "states"), [("jobs", JobState), ("chunks", ChunkState)])
async def test_the_state_enums_are_exactly_what_the_schema_allows(db, table, states):
    assert await allowed_states(db, table) == {str(s) for s in states}
