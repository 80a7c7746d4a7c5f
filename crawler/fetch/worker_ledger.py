"""What a worker asks of the ledger, as one small interface: `WorkerLedger`, and `LedgerAccess`, its
implementation on one `LedgerConnection` (so every call waits out a database outage, up to the
connection's limit, and raises the one-sentence DatabaseError past it).

The worker, its heartbeat and its ResultWriter each hold one of these, bound to the job; they never
see a connection. Tests give them an in-memory ledger instead (tests/fake_ledger.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import asyncpg

from crawler.ledger import cache, registry
from crawler.ledger.cache import CachedResponse
from crawler.ledger.chunks import (
    Lease,
    LeasedChunk,
    chunk_requests,
    lease_chunk,
    mark_first_fetch,
    open_chunks,
    release_chunk,
    renew_leases,
)
from crawler.ledger.database import LedgerConnection
from crawler.ledger.jobs import job_phase
from crawler.ledger.results import BodyRow, ResultRow, write_results
from crawler.ledger.robots_claims import renew_robots_claims
from crawler.states import JobState


class WorkerLedger(Protocol):
    """One job's ledger, as a worker sees it. Every call is safe to repeat; a call raises
    DatabaseError once the database has been away longer than the outage limit."""

    async def register_worker(self, worker_id: str, host: str, pid: int) -> None: ...

    async def worker_heartbeat(self, worker_id: str, fetched: int, *, stopped: bool = False) -> None: ...

    async def live_workers(self, within_seconds: float) -> int:
        """How many workers of the job beat within the window (this one among them)."""
        ...

    async def lease_chunk(self, worker_id: str, lease_seconds: float) -> LeasedChunk | None: ...

    async def mark_first_fetch(self) -> None: ...

    async def chunk_requests(self, chunk: LeasedChunk) -> list:
        """The chunk's rows still to fetch, each with `row_no`, `method`, `url`, `fingerprint`,
        `headers` and `body` (read by key)."""
        ...

    async def cached(self, fingerprints: list[bytes], ttl: float) -> dict[bytes, CachedResponse]: ...

    async def nothing_left(self, held: int) -> bool:
        """True when the job was stopped, or its ingest is over and every chunk not done is one
        of the `held` chunks this worker is finishing."""
        ...

    async def renew_leases(self, leases: Iterable[Lease], lease_seconds: float) -> set[int]:
        """Extend the leases; the chunk numbers whose lease is still ours."""
        ...

    async def renew_robots_claims(self, owner: str, claim_seconds: float) -> None: ...

    async def release_chunk(self, lease: Lease) -> None: ...

    async def write_results(
        self,
        batches: dict[Lease, list[ResultRow]],
        completed: set[Lease],
        lease_seconds: float,
        bodies: dict[Lease, list[BodyRow]],
        cache_rows: list[tuple],
        cache_touch: list[bytes],
    ) -> set[Lease]:
        """Commit the results and complete the `completed` leases, in one transaction; the
        leases refused because their fence moved on (their results are dropped)."""
        ...


class LedgerAccess:
    """WorkerLedger on one LedgerConnection, which this object does not own (its opener closes it)."""

    def __init__(self, db: LedgerConnection, job_id: int) -> None:
        self.db = db
        self.job_id = job_id

    async def register_worker(self, worker_id: str, host: str, pid: int) -> None:
        await self.db.run(registry.register_worker, self.job_id, worker_id, host, pid)

    async def worker_heartbeat(self, worker_id: str, fetched: int, *, stopped: bool = False) -> None:
        await self.db.run(registry.worker_heartbeat, self.job_id, worker_id, fetched, stopped=stopped)

    async def live_workers(self, within_seconds: float) -> int:
        return await self.db.run(registry.live_worker_count, self.job_id, within_seconds)

    async def lease_chunk(self, worker_id: str, lease_seconds: float) -> LeasedChunk | None:
        return await self.db.run(lease_chunk, self.job_id, worker_id, lease_seconds)

    async def mark_first_fetch(self) -> None:
        await self.db.run(mark_first_fetch, self.job_id)

    async def chunk_requests(self, chunk: LeasedChunk) -> list[asyncpg.Record]:
        return await self.db.run(chunk_requests, self.job_id, chunk)

    async def cached(self, fingerprints: list[bytes], ttl: float) -> dict[bytes, CachedResponse]:
        return await self.db.run(cache.lookup, fingerprints, ttl)

    async def nothing_left(self, held: int) -> bool:
        return await self.db.run(_nothing_left, self.job_id, held)

    async def renew_leases(self, leases: Iterable[Lease], lease_seconds: float) -> set[int]:
        return await self.db.run(renew_leases, self.job_id, leases, lease_seconds)

    async def renew_robots_claims(self, owner: str, claim_seconds: float) -> None:
        await self.db.run(renew_robots_claims, self.job_id, owner, claim_seconds)

    async def release_chunk(self, lease: Lease) -> None:
        await self.db.run(release_chunk, self.job_id, lease)

    async def write_results(
        self,
        batches: dict[Lease, list[ResultRow]],
        completed: set[Lease],
        lease_seconds: float,
        bodies: dict[Lease, list[BodyRow]],
        cache_rows: list[tuple],
        cache_touch: list[bytes],
    ) -> set[Lease]:
        return await self.db.run(
            write_results, self.job_id, batches, completed, lease_seconds, bodies, cache_rows, cache_touch
        )


async def _nothing_left(conn: asyncpg.Connection, job_id: int, held: int) -> bool:
    # Both reads in one call: retried together after an outage.
    state, ingest_done = await job_phase(conn, job_id)
    if state in (JobState.DONE, JobState.INTERRUPTED):
        return True  # stopped: its `crawler resume` starts workers anew
    if not ingest_done:
        return False
    return await open_chunks(conn, job_id) <= held
