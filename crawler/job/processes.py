"""Worker processes on this machine: start them (standby.py), restart one that dies within a
budget, tell which died so their leases can go back at once (and a chunk that keeps killing them
is quarantined, release_dead_workers), and turn Ctrl-C or SIGTERM into a drain.

Used by the supervisor of `crawler crawl` and by `crawler worker --workers N`, which joins a job
from another machine and leaves when the job has nothing left for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from crawler.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK
from crawler.job.signals import on_stop
from crawler.job.standby import Standby, send_order, spawn_worker
from crawler.ledger.chunks import release_leases_of
from crawler.ledger.database import LedgerConnection
from crawler.ledger.jobs import Job
from crawler.ledger.quarantine import Released, release_dead_workers
from crawler.settings import Settings

log = logging.getLogger(__name__)

POLL = 0.25
# Seconds between looks for a lease that reached the ledger after its worker was seen dead and its
# leases were given back (below, WorkerProcesses.tend).
LATE_LEASE_LOOK = 1.0


@dataclass
class WorkerSlot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    restarts: int = 0
    restart_at: float = 0.0
    finished: bool = False
    # Its process's exit code once reap() has seen it end. Only reap() looks at the process: a
    # death that watch() saw first (the process ending between the two looks) would be judged,
    # and the slot given a new process, without the dead one's leases ever going back.
    exit_code: int | None = None
    worker_id: str = ""  # host:pid of its current process, the owner of its leases
    # The chunks held at each death not yet explained; a death whose chunk was quarantined is
    # explained and leaves the restart budget, so poisoned chunks cannot exhaust it.
    deaths_on: list[frozenset[int]] = field(default_factory=list)
    explained: int = 0

    @property
    def unexplained(self) -> int:
        return self.restarts - self.explained


class WorkerProcesses:
    def __init__(self, dsn: str, settings: Settings, *, exporter=None, standby: Standby | None = None) -> None:
        self.dsn = dsn
        self.settings = settings
        self.exporter = exporter  # Prometheus, when --metrics-port is set
        self.standby = standby  # processes already started, waiting for the job
        self.stopping = asyncio.Event()
        self._signals = 0
        self.slots: list[WorkerSlot] = []
        self._unreleased: list[str] = []  # dead workers whose leases are not yet given back
        self._slot_of: dict[str, WorkerSlot] = {}  # every worker id started here -> its slot
        self._blameless: set[str] = set()  # dead workers whose death counts on no chunk
        # Dead workers whose leases were given back -> until when a late lease of theirs is looked for.
        self._gone: dict[str, float] = {}
        self._next_late_look = 0.0

    # --- signals ---------------------------------------------------------------------------

    def on_signals(self) -> contextlib.AbstractContextManager[None]:
        """For the block: the first SIGINT or SIGTERM drains the workers, a second kills them."""
        return on_stop(self._on_signal)

    def _on_signal(self) -> None:
        self._signals += 1
        self.stopping.set()
        if self._signals == 1:
            self.signal(signal.SIGTERM)  # drain: stop leasing, finish in-flight, flush
        else:
            self.signal(signal.SIGKILL)  # now: committed results are already safe

    def signal(self, sig: int) -> None:
        for slot in self.slots:
            proc = slot.process
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass

    # --- the processes ---------------------------------------------------------------------

    def start(self, job: Job, count: int) -> None:
        """Set `count` workers on the job: those standing by first, new processes for the rest."""
        waiting = self.standby.take(count) if self.standby is not None else []
        self.slots = [WorkerSlot(i) for i in range(count)]
        for slot in self.slots:
            self._start(slot, job, waiting.pop(0) if waiting else None)

    def _start(self, slot: WorkerSlot, job: Job, started: tuple | None = None) -> None:
        process, sender = started or spawn_worker(slot.index)
        slot.process = process
        slot.worker_id = f"{socket.gethostname()}:{process.pid}"
        self._slot_of[slot.worker_id] = slot
        self._gone.pop(slot.worker_id, None)  # a pid used again: this one's leases are its own
        send_order(sender, self.dsn, job.id, self.settings.as_dict())

    def watch(self, job: Job) -> str | None:
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
            code = slot.exit_code
            if code is None:
                continue  # running, or ended since reap() looked: judged on the next turn
            if code == 0 or self.stopping.is_set():
                slot.finished = True
                continue
            if slot.worker_id in self._unreleased:
                continue  # judged once its leases are given back and its death counted on them
            slot.restarts += 1
            log.warning("worker %d (pid %s) died with exit code %s", slot.index, proc.pid, code)
            if slot.unexplained > self.settings.worker_restarts:
                slot.finished = True
                broken = f"worker {slot.index} died {slot.restarts} times (last exit code {code})"
                continue
            if self.exporter is not None:
                self.exporter.worker_restarted()
            slot.process = None
            slot.exit_code = None
            backoff = self.settings.restart_backoff * 2 ** max(0, slot.unexplained - 1)
            slot.restart_at = now + min(30.0, backoff)
        return broken

    def reap(self) -> list[str]:
        """Worker ids of processes that ended since the last look; those that died can have their
        leases back at once (a dead process cannot commit)."""
        dead = []
        for slot in self.slots:
            proc = slot.process
            if proc is not None and slot.exit_code is None and proc.exitcode is not None:
                slot.exit_code = proc.exitcode
                if self.exporter is not None:
                    self.exporter.worker_exited(proc.pid)
                if slot.exit_code != 0:
                    dead.append(slot.worker_id)
                if slot.exit_code == EXIT_INFRA:
                    # It stopped because the database was away, not because of what it held.
                    self._blameless.add(slot.worker_id)
        return dead

    async def tend(self, db: LedgerConnection, job: Job) -> str | None:
        """One turn of looking after the workers: give dead ones' leases back at once (counting a
        death on each chunk they held; quarantining one at the limit), restart within budget;
        return why the job cannot go on (a drain has then begun)."""
        self._unreleased += self.reap()
        # Retried on every turn until the database takes it: an outage must not leave a dead
        # worker's chunks waiting for their leases to expire.
        if self._unreleased:
            released = await db.try_run(self._release, job.id, self._unreleased)
            if released is not None:
                until = time.monotonic() + self.settings.lease_seconds
                self._gone.update(dict.fromkeys(self._unreleased, until))
                self._unreleased = []
                self._count_deaths(released)
        await self._give_back_late_leases(db, job)
        broken = self.watch(job)
        if broken and not self.stopping.is_set():
            self.stopping.set()
            self.signal(signal.SIGTERM)
        return broken

    async def _give_back_late_leases(self, db: LedgerConnection, job: Job) -> None:
        """A worker killed while its lease statement ran: PostgreSQL finishes the statement and
        commits it, maybe after the worker's leases were given back; that chunk would then wait
        for its lease to expire. Chunks leased by workers seen dead go back, for as long as such a
        lease could still be unexpired, without a death: the worker never held it alive."""
        now = time.monotonic()
        self._gone = {owner: until for owner, until in self._gone.items() if until > now}
        if not self._gone or now < self._next_late_look:
            return
        self._next_late_look = now + LATE_LEASE_LOOK
        late = await db.try_run(release_leases_of, job.id, list(self._gone))
        if late:
            log.warning("gave back %d chunks leased by workers after they died", late)

    async def _release(self, conn, job_id: int, dead: list[str]) -> Released:
        blameless = [owner for owner in dead if owner in self._blameless]
        if blameless:
            await release_leases_of(conn, job_id, blameless)
        blamed = [owner for owner in dead if owner not in self._blameless]
        return await release_dead_workers(conn, job_id, blamed) if blamed else Released({}, [])

    def _count_deaths(self, released: Released) -> None:
        """Note which chunks each dead worker held. A death is explained (the chunk killed it, not
        the worker) and leaves its slot's restart budget when every chunk it held had killed a
        worker before, or once one of them is quarantined: the order in which two workers meet
        the same poisoned chunks then decides nothing. A worker that dies on fresh chunks each
        time is not explained: that is the worker's own failure, and the budget stops the job."""
        for owner, chunks in released.held.items():
            if owner not in self._slot_of:
                continue
            if owner in released.repeats:  # every chunk it held had killed a worker before
                self._slot_of[owner].explained += 1
            else:
                self._slot_of[owner].deaths_on.append(frozenset(chunks))
        for q in released.quarantined:
            log.warning(
                "chunk %d (rows %d-%d) quarantined: workers died %d times holding it; its %d rows"
                " without a result are stored as `internal`",
                q.chunk_no,
                q.first_row,
                q.last_row,
                q.deaths,
                q.given_up,
            )
        gone = {q.chunk_no for q in released.quarantined}
        if gone:
            for slot in self.slots:
                kept = [chunks for chunks in slot.deaths_on if not chunks & gone]
                slot.explained += len(slot.deaths_on) - len(kept)
                slot.deaths_on = kept

    async def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, woken early when a worker process ends (its sentinel becomes
        readable), so that the end of a job or a death is seen at once rather than a poll later."""
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        sentinels = [s.process.sentinel for s in self.slots if s.process is not None and s.process.exitcode is None]
        for fd in sentinels:
            loop.add_reader(fd, ended.set)
        try:
            await asyncio.wait_for(ended.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            for fd in sentinels:
                loop.remove_reader(fd)

    def all_finished(self) -> bool:
        return all(s.finished for s in self.slots)

    async def join(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                await asyncio.to_thread(slot.process.join, 30)


async def join_job(dsn: str, job: Job, settings: Settings, *, exporter=None) -> int:
    """`crawler worker`: fetch the job's chunks with this machine's worker processes until the
    job has nothing left for them. The job's own supervisor ingests and finishes it."""
    pool = WorkerProcesses(dsn, settings, exporter=exporter)
    broken = None
    with pool.on_signals():
        async with LedgerConnection(dsn, outage_limit=settings.db_outage_limit) as db:
            pool.start(job, max(1, settings.effective_workers()))
            try:
                while not pool.all_finished():
                    broken = await pool.tend(db, job) or broken
                    await pool.pause(POLL)
            except BaseException:
                pool.stopping.set()
                pool.signal(signal.SIGTERM)
                await pool.join()
                raise
    if broken:
        print(f"crawler: {broken}; this machine stops fetching (the job goes on elsewhere).", file=sys.stderr)
        return EXIT_INFRA
    return EXIT_INTERRUPTED if pool.stopping.is_set() else EXIT_OK
