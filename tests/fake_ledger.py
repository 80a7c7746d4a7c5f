"""An in-memory ledger for driving a Worker and a ResultWriter without PostgreSQL: `FakeStore` holds one
job's chunks, requests and results; `FakeLedger` is a WorkerLedger on it. Each call goes through a
real LedgerConnection whose connection is a stand-in, so an outage the store simulates (a call
raising the error of a connection gone) meets the real retry loop and its outage limit.

Fences, leases and the one-transaction write behave as crawler/ledger.py's do; what a test needs
to see (the order results were committed in, results written twice) is recorded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from crawler.ledger.chunks import Lease, LeasedChunk
from crawler.ledger.database import LedgerConnection
from crawler.ledger.results import ResultRow
from crawler.states import ChunkState, JobState


@dataclass
class FakeChunk:
    first_row: int
    last_row: int
    state: ChunkState = ChunkState.PENDING
    fence: int = 0
    owner: str | None = None


class FakeConnection:
    """What LedgerConnection holds between calls: only opened, closed or dropped."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeStore:
    job_id: int = 1
    state: JobState = JobState.RUNNING
    ingest_done: bool = True
    chunks: dict[int, FakeChunk] = field(default_factory=dict)
    requests: dict[int, dict] = field(default_factory=dict)
    results: dict[int, ResultRow] = field(default_factory=dict)
    committed: list[int] = field(default_factory=list)  # row numbers, in the order they were committed
    doubled: list[int] = field(default_factory=list)  # row numbers written a second time (never, we hope)
    workers: dict[str, dict] = field(default_factory=dict)
    failing_writes: int = 0  # so many write attempts fail as if the database had gone, then they pass
    writes_down: bool = False  # every write attempt fails so
    write_attempts: int = 0
    renewals: list[set[int]] = field(default_factory=list)  # what each renew_leases kept
    connections: int = 0

    def add_chunk(self, urls: list[str]) -> int:
        """A chunk of GET requests for these URLs; its number."""
        chunk_no = len(self.chunks)
        first = max(self.requests, default=0) + 1
        for offset, url in enumerate(urls):
            row_no = first + offset
            self.requests[row_no] = {
                "row_no": row_no,
                "method": "GET",
                "url": url,
                "fingerprint": row_no.to_bytes(32, "big"),
                "headers": None,
                "body": None,
            }
        self.chunks[chunk_no] = FakeChunk(first, first + len(urls) - 1)
        return chunk_no

    def take_over(self, chunk_no: int, owner: str = "elsewhere:1") -> None:
        """Another worker leases the chunk (ours expired): its fence moves on."""
        chunk = self.chunks[chunk_no]
        chunk.fence += 1
        chunk.owner = owner
        chunk.state = ChunkState.LEASED

    async def connect(self) -> FakeConnection:
        self.connections += 1
        return FakeConnection()

    def ledger(self, outage_limit: float = 300.0) -> FakeLedger:
        return FakeLedger(
            self,
            LedgerConnection(
                "postgresql://fake/ledger", outage_limit=outage_limit, job=self.job_id, connect=self.connect
            ),
        )


def _gone() -> ConnectionResetError:
    return ConnectionResetError(104, "the fake database went away")


class FakeLedger:
    """crawler.fetch.worker_ledger.WorkerLedger on a FakeStore, through a LedgerConnection."""

    def __init__(self, store: FakeStore, db: LedgerConnection) -> None:
        self.store = store
        self.db = db

    async def _call(self, fn, *args, **kwargs):
        async def on(conn: FakeConnection):
            assert not conn.closed
            await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
            return fn(*args, **kwargs)

        return await self.db.run(on)

    async def register_worker(self, worker_id: str, host: str, pid: int) -> None:
        await self._call(
            self.store.workers.__setitem__, worker_id, {"host": host, "pid": pid, "fetched": 0, "stopped": False}
        )

    async def worker_heartbeat(self, worker_id: str, fetched: int, *, stopped: bool = False) -> None:
        await self._call(self.store.workers[worker_id].update, fetched=fetched, stopped=stopped)

    async def live_workers(self, within_seconds: float) -> int:
        return await self._call(lambda: sum(not w["stopped"] for w in self.store.workers.values()))

    async def lease_chunk(self, worker_id: str, lease_seconds: float) -> LeasedChunk | None:
        def lease() -> LeasedChunk | None:
            for chunk_no, chunk in sorted(self.store.chunks.items()):
                if chunk.state == ChunkState.PENDING:
                    chunk.state, chunk.owner = ChunkState.LEASED, worker_id
                    chunk.fence += 1
                    return LeasedChunk(Lease(chunk_no, chunk.fence), chunk.first_row, chunk.last_row)
            return None

        return await self._call(lease)

    async def mark_first_fetch(self) -> None:
        await self._call(lambda: None)

    async def chunk_requests(self, chunk: LeasedChunk) -> list:
        return await self._call(
            lambda: [
                dict(self.store.requests[row])
                for row in range(chunk.first_row, chunk.last_row + 1)
                if row not in self.store.results
            ]
        )

    async def cached(self, fingerprints: list[bytes], ttl: float) -> dict:
        return await self._call(dict)

    async def nothing_left(self, held: int) -> bool:
        def look() -> bool:
            if self.store.state in (JobState.DONE, JobState.INTERRUPTED):
                return True
            if not self.store.ingest_done:
                return False
            return sum(c.state != ChunkState.DONE for c in self.store.chunks.values()) <= held

        return await self._call(look)

    async def renew_leases(self, leases, lease_seconds: float) -> set[int]:
        def renew() -> set[int]:
            kept = {lease.chunk_no for lease in leases if self._current(lease)}
            self.store.renewals.append(kept)
            return kept

        return await self._call(renew)

    async def renew_robots_claims(self, owner: str, claim_seconds: float) -> None:
        await self._call(lambda: None)

    async def release_chunk(self, lease: Lease) -> None:
        def release() -> None:
            if self._current(lease):
                chunk = self.store.chunks[lease.chunk_no]
                chunk.state, chunk.owner = ChunkState.PENDING, None

        await self._call(release)

    async def write_results(self, batches, completed, lease_seconds, bodies, cache_rows, cache_touch) -> set[Lease]:
        def write() -> set[Lease]:
            # One transaction: a failed attempt leaves nothing behind.
            self.store.write_attempts += 1
            if self.store.writes_down:
                raise _gone()
            if self.store.failing_writes > 0:
                self.store.failing_writes -= 1
                raise _gone()
            refused = {lease for lease in set(batches) | completed if not self._current(lease)}
            for lease, records in batches.items():
                if lease in refused:
                    continue
                for record in records:
                    if record.row_no in self.store.results:
                        self.store.doubled.append(record.row_no)
                    self.store.results[record.row_no] = record
                    self.store.committed.append(record.row_no)
            for lease in completed - refused:
                chunk = self.store.chunks[lease.chunk_no]
                chunk.state, chunk.owner = ChunkState.DONE, None
            return refused

        return await self._call(write)

    def _current(self, lease: Lease) -> bool:
        chunk = self.store.chunks[lease.chunk_no]
        return chunk.fence == lease.fence and chunk.state == ChunkState.LEASED
