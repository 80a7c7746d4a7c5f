"""The supervisor: streams the input into chunks in the ledger, starts worker processes (spawn),
restarts one that dies, shows progress, and turns Ctrl-C or SIGTERM into a drain.

It never fetches and never holds more than one batch of input in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import psutil

from crawler import ledger
from crawler.database import LedgerConnection, mask_dsn
from crawler.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, DatabaseError
from crawler.inputs import RowReader, open_input
from crawler.ledger import Job
from crawler.progress import ProgressView
from crawler.settings import Settings
from crawler.worker import run_worker

log = logging.getLogger(__name__)

POLL = 0.25


@dataclass
class WorkerSlot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    restarts: int = 0
    restart_at: float = 0.0
    finished: bool = False
    reaped: bool = False


@dataclass
class CrawlOutcome:
    job: Job
    exit_code: int
    message: str | None = None
    summary: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, dsn: str, settings: Settings, *, progress: ProgressView) -> None:
        self.dsn = dsn
        self.settings = settings
        self.progress = progress
        self.stopping = asyncio.Event()
        self._signals = 0
        self._ctx = multiprocessing.get_context("spawn")
        self.slots: list[WorkerSlot] = []
        self._unreleased: list[str] = []  # dead workers whose leases are not yet given back
        self._outage_since: float | None = None
        self._reads = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="input")

    # --- signals ---------------------------------------------------------------------------

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        self._signals += 1
        self.stopping.set()
        if self._signals == 1:
            self._signal_workers(signal.SIGTERM)  # drain: stop leasing, finish in-flight, flush
        else:
            self._signal_workers(signal.SIGKILL)  # now: committed results are already safe

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            proc = slot.process
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass

    # --- workers ---------------------------------------------------------------------------

    def _start(self, slot: WorkerSlot, job: Job) -> None:
        proc = self._ctx.Process(
            target=run_worker, args=(self.dsn, job.id, self.settings.as_dict()),
            name=f"crawler-worker-{slot.index}", daemon=False,
        )
        proc.start()
        slot.process = proc

    def _watch(self, job: Job) -> str | None:
        """Restart dead workers within budget; return a reason when the job cannot go on."""
        now = time.monotonic()
        broken = None
        for slot in self.slots:
            proc = slot.process
            if slot.finished:
                continue
            if proc is None:  # waiting out its restart backoff
                if self.stopping.is_set():
                    slot.finished = True
                elif now >= slot.restart_at:
                    self._start(slot, job)
                continue
            if proc.exitcode is None:
                continue
            if proc.exitcode == 0 or self.stopping.is_set():
                slot.finished = True
                continue
            slot.restarts += 1
            log.warning("worker %d (pid %s) died with exit code %s", slot.index, proc.pid, proc.exitcode)
            if slot.restarts > self.settings.worker_restarts:
                slot.finished = True
                broken = f"worker {slot.index} died {slot.restarts} times (last exit code {proc.exitcode})"
                continue
            slot.process = None
            slot.reaped = False
            slot.restart_at = now + min(30.0, self.settings.restart_backoff * 2 ** (slot.restarts - 1))
        return broken

    def live_workers(self) -> int:
        return sum(1 for s in self.slots if s.process is not None and s.process.exitcode is None)

    # --- the job ---------------------------------------------------------------------------

    async def run(self, job: Job, reader: RowReader | None) -> CrawlOutcome:
        limit = self.settings.db_outage_limit
        async with LedgerConnection(self.dsn, outage_limit=limit) as db:
            released = await db.run(release_dead_local_leases, job.id)
            if released:
                log.warning("released %d chunks leased by workers that are gone", released)
            self.slots = [WorkerSlot(i) for i in range(self.settings.effective_workers())]
            for slot in self.slots:
                self._start(slot, job)
            ingest = asyncio.create_task(self._ingest(job, reader)) if reader is not None else None
            broken = None
            try:
                while True:
                    self._unreleased += self._reap()
                    if self._unreleased:
                        # Retried on every turn until the database takes it: an outage must not
                        # leave a dead worker's chunks waiting for their leases to expire.
                        if await db.try_run(ledger.release_leases_of, job.id, self._unreleased) is not None:
                            self._unreleased = []
                    broken = self._watch(job) or broken
                    if broken and not self.stopping.is_set():
                        self.stopping.set()
                        self._signal_workers(signal.SIGTERM)
                    counts = await db.try_run(ledger.job_counts, job.id)
                    self._check_outage(counts is None, job)
                    if counts is not None:
                        counts["ingest_done"] = ingest is None or ingest.done()
                        if reader is not None:
                            counts["bytes_read"], counts["bytes_total"] = reader.bytes_read, reader.bytes_total
                        workers = await db.try_run(ledger.live_workers, job.id, 3 * self.settings.heartbeat_seconds)
                        self.progress.update(counts, [dict(w) for w in workers or ()])
                    if ingest is not None and ingest.done():
                        ingest.result()  # an ingest failure ends the crawl with its own error
                    if all(s.finished for s in self.slots):
                        break
                    await asyncio.sleep(POLL)
            except BaseException:
                self.stopping.set()
                self._signal_workers(signal.SIGTERM)
                await self._join_workers()
                await db.try_run(ledger.set_job_state, job.id, "interrupted")
                raise
            finally:
                if ingest is not None:
                    if not ingest.done():
                        ingest.cancel()
                    await asyncio.gather(ingest, return_exceptions=True)  # its error is retrieved, or raised above
            if not self.stopping.is_set() and await db.run(ledger.finish_job, job.id):
                return CrawlOutcome(job, EXIT_OK)
            await db.run(ledger.set_job_state, job.id, "interrupted")
        ref = job.name or job.id
        if broken:
            return CrawlOutcome(job, EXIT_INFRA, f"{broken}; the job is stopped; run `crawler resume {ref}` once fixed.")
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

    def _reap(self) -> list[str]:
        """Worker ids of processes that died since the last look (their leases can go back now:
        a dead process cannot commit)."""
        dead = []
        for slot in self.slots:
            proc = slot.process
            if proc is not None and proc.exitcode not in (None, 0) and not slot.reaped:
                slot.reaped = True
                dead.append(f"{socket.gethostname()}:{proc.pid}")
        return dead

    async def _join_workers(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                await asyncio.to_thread(slot.process.join, 30)

    async def _ingest(self, job: Job, reader: RowReader) -> None:
        """Stream the input into chunks; on resume, skip the rows already stored."""
        limit = self.settings.db_outage_limit
        try:
            async with LedgerConnection(self.dsn, outage_limit=limit, setup=ledger.prepare_ingest) as db:
                chunk_no, last_row = await db.run(ledger.ingest_position, job.id)
                batches = reader.batches(self.settings.chunk_size)
                while not self.stopping.is_set():
                    # Reading blocks, so it runs in a thread; the reader is closed only after the
                    # read in flight has returned, even when this task is cancelled.
                    reading = self._reads.submit(next, batches, None)
                    try:
                        batch = await asyncio.wrap_future(reading)
                    except asyncio.CancelledError:
                        await asyncio.to_thread(concurrent.futures.wait, [reading])
                        raise
                    if batch is None:
                        break
                    batch = [row for row in batch if row.row > last_row]
                    if not batch:
                        continue
                    await db.run(ledger.store_chunk, job.id, chunk_no, batch, dedup=not self.settings.no_cache)
                    chunk_no += 1
                if not self.stopping.is_set():
                    await db.run(ledger.mark_ingested, job.id)
        finally:
            reader.close()
            self._reads.shutdown(wait=False)


async def release_dead_local_leases(conn, job_id: int) -> int:
    """Leases held by worker processes of this host that no longer exist (after a supervisor
    was killed with its workers) go back at once instead of waiting for their expiry."""
    host = socket.gethostname()
    dead = []
    for owner in await ledger.lease_owners(conn, job_id):
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            dead.append(owner)
    return await ledger.release_leases_of(conn, job_id, dead) if dead else 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
