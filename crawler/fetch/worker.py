"""A worker: leases chunks from the ledger, fetches their requests with a fixed pool of tasks fed
by a bounded queue, and hands results to the ResultWriter. One process, one uvloop loop, one
aiohttp session. Runs the same under the local supervisor or on another machine.

A retry waits on a timer, not in a fetch slot. A drain stops leasing, lets in-flight requests
finish within a grace period, flushes, and gives unfinished chunks back.

A Worker is given its collaborators (its ledger access, writer, fetcher, host scheduler);
`open_worker` opens and wires the real ones for a process, and closes them.

The processes, their tasks and what each owns: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crawler import metrics
from crawler.fetch.fetcher import MAX_WIDTH, Attempt, Fetcher
from crawler.fetch.hosts import HostScheduler, host_of
from crawler.fetch.retry import decide, parse_retry_after
from crawler.fetch.worker_ledger import WorkerLedger
from crawler.fetch.writer import ResultWriter
from crawler.kinds import ErrorKind
from crawler.ledger import cache, registry
from crawler.ledger.cache import CachedResponse
from crawler.ledger.chunks import Lease, LeasedChunk
from crawler.ledger.results import ResultRow
from crawler.settings import Settings

if TYPE_CHECKING:
    from crawler.fetch.robots_gate import RobotsGate

log = logging.getLogger(__name__)

_new_row = tuple.__new__  # see Worker._done

IDLE_POLL = 0.1  # seconds between looks for new chunks while the supervisor is still ingesting
# A request running longer than `slow_after` stops counting against the concurrency: another
# fetch task takes its place, up to MAX_WIDTH times `concurrency` tasks in all, so hosts that
# answer in seconds (or time out) hold their own per-host slots and not the whole pool.
WIDEN_EVERY = 0.25  # seconds between looks at how many requests are slow


@dataclass(slots=True)
class WorkItem:
    lease: Lease
    row_no: int
    method: str
    url: str
    host: str  # the per-host scheduler's key (hosts.host_of), worked out once
    headers: str | None = None  # a JSON object, as stored
    body: bytes | None = None
    fingerprint: bytes = b""
    cached: CachedResponse | None = None  # a stale stored response to revalidate
    attempts: int = 0
    elapsed_ms: float = 0.0


@dataclass(slots=True)
class HeldChunk:
    lease: Lease
    remaining: int


@dataclass(slots=True)
class WorkerStats:
    chunks: int = 0
    fetched: int = 0
    retries: int = 0
    lost_leases: int = 0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def first_share(settings: Settings) -> int:
    # A host's budget is shared by every live worker of the job, on every machine, not
    # multiplied by them: until the registry has been read, by this machine's workers.
    return max(1, settings.effective_workers())


def host_scheduler(settings: Settings) -> HostScheduler:
    """The per-host scheduler of a worker that has not yet counted who shares the job."""
    return HostScheduler(
        **settings.host_budget(first_share(settings))._asdict(),
        adaptive=settings.adaptive_concurrency,
        key=operator.attrgetter("host"),
    )


# What a worker asks of --robots obey's gate maker: (worker id, settings, retry policy, and the
# worker's release / refuse / pace / fetching callbacks as keywords) -> a RobotsGate.
RobotsGateMaker = Callable[..., "RobotsGate"]


class Worker:
    """Leases, fetches and hands results on for one job, with what it is given: `ledger` for the
    feed and the end, `beat` (a second connection, so a slow write never delays the heartbeat),
    `writer` (on a third), an open `fetcher`, the `hosts` scheduler (host_scheduler(settings)),
    and with --robots obey a `robots` gate maker. It owns none of them but the robots gate.
    Setting `stop` (made here unless given) drains it."""

    def __init__(
        self,
        settings: Settings,
        job_id: int,
        *,
        ledger: WorkerLedger,
        beat: WorkerLedger,
        writer: ResultWriter,
        fetcher: Fetcher,
        hosts: HostScheduler,
        robots: RobotsGateMaker | None = None,
        stop: asyncio.Event | None = None,
        grace: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.settings = settings
        self.ledger = ledger
        self.beat = beat
        self.writer = writer
        self.fetcher = fetcher
        self.hosts = hosts
        self.grace = settings.drain_grace if grace is None else grace
        self.id = worker_id()
        self.stop = asyncio.Event() if stop is None else stop
        self.stats = WorkerStats()
        self.policy = settings.retry_policy
        self.share = first_share(settings)  # as `hosts` was made for
        self._in_flight = 0
        self._slow = 0  # requests in flight longer than slow_after (at the last look)
        self._surplus = 0  # fetch tasks to end, the slow requests they replaced having ended
        self._fetchers: set[asyncio.Task] = set()
        self._held: dict[int, HeldChunk] = {}
        self._lost: set[Lease] = set()  # leases taken over by another worker: their items are dropped
        self._in_system = 0  # items queued, in flight or waiting to retry
        self._low_water = asyncio.Event()
        self._idle = asyncio.Event()  # set when no item is in the system
        self._idle.set()
        self._timers: set[asyncio.TimerHandle] = set()
        # A test hook (unset: off): the seed of the retries' jitter, so that a test knows each delay
        # the policy draws and can hold the server's arrival times to it.
        seed = os.environ.get("CRAWLER_TEST_RETRY_SEED")
        self._rng = random.Random(int(seed)) if seed else random.Random()
        self.caching = settings.cache_ttl > 0 and not settings.no_cache  # the cross-job cache
        self.high_water = settings.concurrency * 2
        # With many items waiting on slow hosts, lease more so that other hosts keep the pool
        # busy — up to a hard bound, so memory stays O(chunk size + concurrency).
        self.max_in_system = self.high_water + 4 * settings.chunk_size
        self.metrics = metrics.for_worker()
        # A test hook (unset: off): the worker dies when it leases a chunk holding one of these
        # rows (comma-separated) while the row still needs a fetch, as a chunk that kills its
        # workers would make it. Read once; checked once per chunk, never per request.
        hook = os.environ.get("CRAWLER_TEST_EXIT_ON_ROW") or ""
        self.exit_on_rows = frozenset(int(row) for row in hook.split(",") if row.strip())
        self.robots: RobotsGate | None = None  # --robots obey: rows wait at the gate for their host's robots.txt
        if robots is not None:
            self.robots = robots(
                self.id,
                settings,
                self.policy,
                release=self.hosts.put,
                refuse=self._refuse,
                pace=self._pace,
                fetching=self._robots_fetching,
            )

    async def _count_workers(self, db: WorkerLedger, *, floor: int = 1) -> None:
        window = registry.LIVE_BEATS * self.settings.heartbeat_seconds
        share = max(floor, await db.live_workers(window))
        if share != self.share:
            log.info("%d workers share the job: per-host budgets divided by %d", share, share)
            self.share = share
            self.hosts.rescale(**self.settings.host_budget(share)._asdict())

    async def run(self) -> WorkerStats:
        s = self.settings
        db = self.ledger
        host, pid = self.id.rsplit(":", 1)
        try:
            await db.register_worker(self.id, host, int(pid))
            await self._count_workers(db, floor=self.share)  # siblings may not have registered yet
            async with asyncio.TaskGroup() as tg:
                self.writer.start(tg)
                beat = tg.create_task(self._heartbeat())
                for _ in range(s.concurrency):
                    self._start_fetcher(tg)
                widen = tg.create_task(self._widen(tg))
                gate = tg.create_task(self.robots.run(self.fetcher)) if self.robots is not None else None
                await self._feed()
                await self._finish(widen)
                if gate is not None and self.robots is not None:
                    self.robots.close()  # robots.txt fetches under way get the drain's grace
                    if not (await asyncio.wait([gate], timeout=self.grace))[0]:
                        gate.cancel()
                beat.cancel()
                await self.writer.close()
            await self._release_unfinished()
            await db.worker_heartbeat(self.id, self.stats.fetched, stopped=True)
        finally:
            if self.robots is not None:
                await self.robots.aclose()
        self.stats.lost_leases = len(self.writer.lost)
        return self.stats

    # --- leasing ---------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Lease chunks while there is room, until the job has nothing left for us or we stop."""
        db = self.ledger
        first = True
        while not self.stop.is_set():
            if not self._wants_more():
                self._low_water.clear()
                # Also look again now and then: a paused host can starve the pool with no answer
                # arriving to wake us.
                await self._wait_stop_or(self._low_water.wait(), timeout=0.5)
                continue
            chunk = await db.lease_chunk(self.id, self.settings.lease_seconds)
            if chunk is None:
                if await db.nothing_left(len(self._held)):
                    return
                await self._wait_stop_or(asyncio.sleep(IDLE_POLL))
                continue
            if first:
                await db.mark_first_fetch()
                first = False
            lease = chunk.lease
            rows = await db.chunk_requests(chunk)
            if self.exit_on_rows:
                _die_on_rows(self.exit_on_rows, chunk, rows)
            self.stats.chunks += 1
            if not rows:
                self.writer.complete(lease)
                continue
            self._held[lease.chunk_no] = HeldChunk(lease, len(rows))
            self._in_system += len(rows)
            self._idle.clear()
            # Held for robots.txt, chunk by chunk.
            admitted: list[WorkItem] | None = [] if self.robots is not None else None
            stored = {}
            if self.caching:
                stored = await db.cached([row["fingerprint"] for row in rows], self.settings.cache_ttl)
            for row in rows:
                url = row["url"]
                # Positional: a dataclass's __init__ called with keywords costs a row 1.8 k instructions more.
                item = WorkItem(
                    lease,
                    row["row_no"],
                    row["method"],
                    url,
                    host_of(url),
                    row["headers"],
                    row["body"],
                    row["fingerprint"],
                )
                entry = stored.get(item.fingerprint)
                if entry is not None and entry.fresh:
                    if self.writer.full:
                        await self.writer.room()
                    self._done(item, _from_cache(entry), cache_kind="fresh")
                    continue
                item.cached = entry
                if admitted is None:
                    self.hosts.put(item)
                else:
                    admitted.append(item)
            if admitted and self.robots is not None:
                await self.robots.admit(admitted)

    def _wants_more(self) -> bool:
        if self._in_system >= self.max_in_system:
            return False
        # Slow requests count for nothing here, as for the concurrency (see _widen).
        starving = self.hosts.ready.qsize() == 0 and self._in_flight - self._slow < self.settings.concurrency
        return self._in_system - self._slow < self.high_water or starving

    async def _wait_stop_or(self, aw, timeout: float | None = None) -> None:
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
            stopper.cancel()

    async def _heartbeat(self) -> None:
        """Renew our leases well before they expire, so a long chunk is not taken from us, tell
        the registry we are alive (what `crawler status` shows), and count who shares the job."""
        db = self.beat
        interval = min(self.settings.heartbeat_seconds, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            leases = [h.lease for h in self._held.values()]
            kept = await db.renew_leases(leases, self.settings.lease_seconds)
            await db.worker_heartbeat(self.id, self.stats.fetched)
            if self.robots is not None:
                await self.robots.renew(db)
            await self._count_workers(db)
            for lease in leases:
                held = self._held.get(lease.chunk_no)
                if lease.chunk_no not in kept and held is not None and held.lease == lease:
                    # Another worker has it now (ours expired): what we have not fetched yet is
                    # dropped, and results still on their way will be refused.
                    log.warning("lost the lease on chunk %d; its remaining requests are dropped", lease.chunk_no)
                    del self._held[lease.chunk_no]
                    self._lost.add(lease)

    # --- fetching --------------------------------------------------------------------------

    def _start_fetcher(self, tg: asyncio.TaskGroup) -> None:
        task = tg.create_task(self._fetch_loop(self.fetcher))
        self._fetchers.add(task)
        task.add_done_callback(self._fetchers.discard)

    async def _widen(self, tg: asyncio.TaskGroup) -> None:
        """Keep `concurrency` fetch tasks free of slow requests: one more task per request in
        flight longer than slow_after, up to MAX_WIDTH x concurrency; the extra tasks end once
        the slow requests have."""
        s = self.settings
        while True:
            await asyncio.sleep(WIDEN_EVERY)
            self._slow = self.fetcher.slow_requests(s.slow_after)
            want = min(s.concurrency + self._slow, MAX_WIDTH * s.concurrency)
            while len(self._fetchers) < want:
                self._start_fetcher(tg)
            self._surplus = len(self._fetchers) - want
            if self._slow and self._wants_more():
                self._low_water.set()

    async def _fetch_loop(self, fetcher: Fetcher) -> None:
        while True:
            if self._surplus > 0:  # a slow request this task stood in for has ended
                self._surplus -= 1
                return
            item = await self.hosts.ready.get()
            if item is None:
                return
            if self._lost and item.lease in self._lost:
                self.hosts.cancel(item)
                self._left_system()
                continue
            self._in_flight += 1
            self.metrics.fetch_started()
            try:
                attempt = await fetcher.attempt(
                    item.method,
                    item.url,
                    headers=item.headers,
                    body=item.body,
                    validators=item.cached.validators() if item.cached else None,
                    encoded=True,
                )  # the URL to send, made at ingest: sent as written
            finally:
                self._in_flight -= 1
                self.metrics.fetch_ended()
            self.metrics.attempted(attempt)
            item.attempts += 1
            item.elapsed_ms += attempt.elapsed_ms
            decision = decide(
                error_kind=attempt.error_kind,
                status=attempt.status,
                retry_after=attempt.retry_after,
                attempts=item.attempts,
                policy=self.policy,
                rng=self._rng,
                transient=attempt.transient,
            )
            pause = 0.0
            if attempt.status in (429, 503):  # its Retry-After holds the host back
                pause = min(parse_retry_after(attempt.retry_after) or 0.0, self.settings.retry_after_max)
            self.hosts.done(
                item,
                error_kind=attempt.error_kind,
                status=attempt.status,
                elapsed=attempt.elapsed_ms / 1000.0,
                pause=pause,
            )
            if decision.retry and not self.stop.is_set():
                self.stats.retries += 1
                self._schedule_retry(item, decision.delay)
                continue
            if decision.reason:
                attempt.error = f"{attempt.error}; {decision.reason}"
            cache_kind = None
            if attempt.status == 304 and item.cached is not None:  # the stored response still holds
                served = _from_cache(item.cached)
                served.elapsed_ms = attempt.elapsed_ms
                attempt, cache_kind = served, "revalidated"
            if self.writer.full:
                await self.writer.room()
            self._done(item, attempt, cache_kind=cache_kind)

    def _schedule_retry(self, item: WorkItem, delay: float) -> None:
        self.metrics.retried()
        loop = asyncio.get_running_loop()

        def requeue() -> None:
            self._timers.discard(handle)
            self.hosts.put(item)

        handle = loop.call_later(delay, requeue)
        self._timers.add(handle)

    def _done(self, item: WorkItem, attempt: Attempt, *, cache_kind: str | None = None) -> None:
        """Hand the item's outcome to the writer (the caller has waited for its room)."""
        # A ResultRow, its fields in order, made as _make makes it but without its Python-level call:
        # 0.25 us a result against 0.5 us positionally and 2 us with keywords (timeit, one core).
        record = _new_row(
            ResultRow,
            (
                self.job_id,
                item.row_no,
                attempt.status,
                attempt.final_url,
                attempt.error_kind,
                attempt.error,
                item.attempts,
                cache_kind is not None,
                item.elapsed_ms,
                attempt.body_bytes,
                attempt.body_sha256,
                cache_kind,
            ),
        )
        remember: tuple | bytes | None = None
        if self.caching:
            if cache_kind == "revalidated":
                remember = item.fingerprint  # confirmed by a 304: fresh again
            elif cache_kind is None:
                remember = cache.cache_row(
                    item.fingerprint,
                    self.job_id,
                    status=attempt.status,
                    error_kind=attempt.error_kind,
                    final_url=attempt.final_url,
                    body_bytes=attempt.body_bytes,
                    body_sha256=attempt.body_sha256,
                    etag=attempt.etag,
                    last_modified=attempt.last_modified,
                )
        self.writer.add(item.lease, record, attempt.body, remember)
        if cache_kind is not None:
            self.metrics.cache_hit(cache_kind)
        self.stats.fetched += 1
        held = self._held.get(item.lease.chunk_no)
        if held is not None and held.lease == item.lease:
            held.remaining -= 1
            if held.remaining == 0:
                del self._held[item.lease.chunk_no]
                self.writer.complete(item.lease)
        self._left_system()

    async def _refuse(self, item: WorkItem, reason: str) -> None:
        """A row its host's robots.txt forbids (or that robots.txt stayed unreachable): a result
        with the error kind `robots`, never retried."""
        if self._lost and item.lease in self._lost:
            self._left_system()
            return
        if self.writer.full:
            await self.writer.room()
        self._done(item, Attempt(error_kind=ErrorKind.ROBOTS, error=reason))

    def _robots_fetching(self, change: int) -> None:
        # A robots.txt fetch fills a fetch slot as a row does, until its rows are let go: while
        # the gate works for the rows it holds, the worker is not starved and does not lease
        # further ahead. (Leased ahead, the same hosts' rows pile up at the gate and go out
        # together, each on a new connection: 4x the connections at 2 000 hosts, RESULTS.md.)
        self._in_flight += change

    def _pace(self, host: str, delay: float, hold: bool) -> None:
        # A Crawl-delay is the host's, shared by every worker of the job as per_host_rate is.
        self.hosts.pace(host, delay * self.share, hold=hold)

    def _left_system(self) -> None:
        self._in_system -= 1
        if self._wants_more():
            self._low_water.set()
        if self._in_system == 0:
            self._idle.set()

    # --- ending ----------------------------------------------------------------------------

    async def _finish(self, widen: asyncio.Task) -> None:
        """Either every item is done (normal end), or we are draining: drop what has not started,
        let in-flight requests finish within the grace period."""
        if not self.stop.is_set():
            await self._wait_stop_or(self._idle.wait())
        widen.cancel()
        fetchers = list(self._fetchers)
        if self.stop.is_set():
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()
            self.hosts.clear()
            if self.robots is not None:
                self.robots.clear()
        for _ in fetchers:
            self.hosts.ready.put_nowait(None)
        done, pending = await asyncio.wait(fetchers, timeout=self.grace)
        for task in pending:
            task.cancel()

    async def _release_unfinished(self) -> None:
        for held in list(self._held.values()):
            await self.ledger.release_chunk(held.lease)
        self._held.clear()


def _die_on_rows(exit_on_rows: frozenset[int], chunk: LeasedChunk, rows: list) -> None:
    if any(chunk.first_row <= row <= chunk.last_row for row in exit_on_rows):
        hit = sorted(exit_on_rows & {row["row_no"] for row in rows})
        if hit:
            log.error("test hook CRAWLER_TEST_EXIT_ON_ROW: exiting on row %d", hit[0])
            os._exit(3)


def _from_cache(entry: CachedResponse) -> Attempt:
    error_kind = ErrorKind.HTTP_STATUS if entry.status >= 400 else None
    return Attempt(
        status=entry.status,
        final_url=entry.final_url,
        error_kind=error_kind,
        error=f"HTTP {entry.status} (stored)" if error_kind else None,
        body_bytes=entry.body_bytes,
        body_sha256=entry.body_sha256,
    )
