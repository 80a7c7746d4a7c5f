"""The supervisor: streams the input into chunks in the ledger, runs this machine's worker
processes (processes.py), shows progress, and finishes the job once every chunk is done.

It never fetches and never holds more than one batch of input in memory. With no local workers
(--workers 0) it only ingests and watches while `crawler worker` on other machines fetches.

The processes, their tasks and what each owns: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass, field

import psutil

from crawler.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, DatabaseError
from crawler.job.inputs import RowReader
from crawler.job.processes import POLL, WorkerProcesses
from crawler.job.progress import ProgressView
from crawler.job.standby import Standby
from crawler.ledger import registry
from crawler.ledger.chunks import (
    analyze_chunks,
    ingest_position,
    lease_owners,
    mark_ingested,
    release_leases_of,
    store_chunk,
)
from crawler.ledger.database import LedgerConnection, mask_dsn
from crawler.ledger.jobs import Job, job_counts, set_job_state
from crawler.ledger.results import finish_job
from crawler.settings import Settings
from crawler.states import JobState

log = logging.getLogger(__name__)

LOOK_EVERY = 1.0  # seconds between looks at the job's counts (progress, metrics, the end of a job)
# Chunk counts at which ingest refreshes the planner's statistics of `chunks`: leasing a new job's
# chunks with stale ones sorts or walks every chunk of the job (measured: 30-390 ms per lease at
# 60 000 chunks, against 0.1 s for an ANALYZE).
ANALYZE_AT = frozenset(64 * 8**k for k in range(6))


@dataclass
class CrawlOutcome:
    job: Job
    exit_code: int
    message: str | None = None
    summary: dict = field(default_factory=dict)


class Supervisor:
    def __init__(
        self, dsn: str, settings: Settings, *, progress: ProgressView, exporter=None, standby: Standby | None = None
    ) -> None:
        self.dsn = dsn
        self.settings = settings
        self.progress = progress
        self.exporter = exporter
        self.pool = WorkerProcesses(dsn, settings, exporter=exporter, standby=standby)
        self.stopping = self.pool.stopping
        self._outage_since: float | None = None

    def on_signals(self) -> contextlib.AbstractContextManager[None]:
        """For the block: the first SIGINT or SIGTERM drains the workers, a second kills them."""
        return self.pool.on_signals()

    async def run(self, job: Job, reader: RowReader | None) -> CrawlOutcome:
        limit = self.settings.db_outage_limit
        local = self.settings.effective_workers()
        async with LedgerConnection(self.dsn, outage_limit=limit, job=job.name or job.id) as db:
            released = await db.run(release_dead_local_leases, job.id)
            if released:
                log.warning("released %d chunks leased by workers that are gone", released)
            self.pool.start(job, local)
            if local == 0:
                self.progress.note(
                    f"no workers here (--workers 0): run `crawler worker --job {job.name or job.id}`"
                    " with this database on the machines that fetch."
                )
            ingest = asyncio.create_task(self._ingest(job, reader)) if reader is not None else None
            broken = None
            next_look = 0.0
            try:
                while True:
                    broken = await self.pool.tend(db, job) or broken
                    finished = local > 0 and self.pool.all_finished()
                    counts = None
                    # The counts sum every chunk of the job: read once a second, and once more at
                    # the end, so that the last progress shown is the job's final state.
                    if time.monotonic() >= next_look or finished:
                        next_look = time.monotonic() + LOOK_EVERY
                        counts = await db.try_run(job_counts, job.id)
                        self._check_outage(counts is None, job)
                    if counts is not None:
                        counts.ingest_done = ingest is None or ingest.done()
                        if reader is not None:
                            counts.bytes_read, counts.bytes_total = reader.bytes_read, reader.bytes_total
                        workers = await db.try_run(
                            registry.live_workers, job.id, registry.LIVE_BEATS * self.settings.heartbeat_seconds
                        )
                        self.progress.update(counts, [dict(w) for w in workers or ()])
                        if self.exporter is not None:
                            self.exporter.observe_job(counts)
                    if ingest is not None and ingest.done():
                        ingest.result()  # an ingest failure ends the crawl with its own error
                    if local == 0:
                        # Fetched elsewhere: done when every chunk is, or on a signal.
                        if self.stopping.is_set() or (
                            counts is not None and counts.ingest_done and counts.pending == counts.leased == 0
                        ):
                            break
                    elif finished:
                        break
                    await self.pool.pause(POLL)
            except BaseException:
                self.stopping.set()
                self.pool.signal(signal.SIGTERM)
                await self.pool.join()
                await db.try_run(set_job_state, job.id, JobState.INTERRUPTED)
                raise
            finally:
                if ingest is not None:
                    if not ingest.done():
                        ingest.cancel()
                    await asyncio.gather(ingest, return_exceptions=True)  # its error is retrieved, or raised above
            if not self.stopping.is_set() and await db.run(finish_job, job.id):
                return CrawlOutcome(job, EXIT_OK)
            await db.run(set_job_state, job.id, JobState.INTERRUPTED)
        ref = job.name or job.id
        if broken:
            return CrawlOutcome(
                job, EXIT_INFRA, f"{broken}; the job is stopped; run `crawler resume {ref}` once fixed."
            )
        return CrawlOutcome(job, EXIT_INTERRUPTED, f"interrupted; run `crawler resume {ref}` to finish the job.")

    def _check_outage(self, failing: bool, job: Job) -> None:
        """Stop the job (resumable) once the database has been away longer than allowed."""
        if not failing:
            self._outage_since = None
            return
        now = time.monotonic()
        self._outage_since = self._outage_since or now
        if now - self._outage_since > self.settings.db_outage_limit:
            raise DatabaseError(
                f"PostgreSQL at {mask_dsn(self.dsn)} was unavailable for more than"
                f" {self.settings.db_outage_limit:g}s; once it is back, `crawler resume {job.name or job.id}`"
                f" finishes the job."
            )

    async def _ingest(self, job: Job, reader: RowReader) -> None:
        """Stream the input into chunks; on resume, skip the rows already stored."""
        limit = self.settings.db_outage_limit
        # Reading blocks, so it runs on a thread of its own; the pool lives as long as this task.
        reads = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="input")
        try:
            async with LedgerConnection(self.dsn, outage_limit=limit, job=job.name or job.id) as db:
                chunk_no, last_row = await db.run(ingest_position, job.id)
                batches = reader.batches(self.settings.chunk_size)
                while not self.stopping.is_set():
                    # Reading blocks, so it runs in a thread; the reader is closed only after the
                    # read in flight has returned, even when this task is cancelled.
                    reading = reads.submit(next, batches, None)
                    try:
                        batch = await asyncio.wrap_future(reading)
                    except asyncio.CancelledError:
                        await asyncio.to_thread(concurrent.futures.wait, [reading])
                        raise
                    if batch is None:
                        break
                    if batch[0].row <= last_row:  # resuming: skip the rows already stored
                        batch = [row for row in batch if row.row > last_row]
                        if not batch:
                            continue
                    await db.run(store_chunk, job.id, chunk_no, batch, dedup=not self.settings.no_cache)
                    chunk_no += 1
                    if chunk_no in ANALYZE_AT:
                        await db.run(analyze_chunks)
                if not self.stopping.is_set():
                    await db.run(mark_ingested, job.id)
        finally:
            reader.close()
            reads.shutdown(wait=False)


async def release_dead_local_leases(conn, job_id: int) -> int:
    """Leases held by worker processes of this host that no longer exist (after a supervisor
    was killed with its workers) go back at once instead of waiting for their expiry."""
    host = socket.gethostname()
    dead = []
    for owner in await lease_owners(conn, job_id):
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            dead.append(owner)
    return await release_leases_of(conn, job_id, dead) if dead else 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
