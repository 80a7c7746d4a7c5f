"""ResultWriter: buffers a worker's results and commits them to the ledger in batches (COPY),
each chunk's last results together with its completion, retrying while the database is away.

It never drops a buffered result; when its buffer is full, `add` waits (backpressure on fetching).
It writes through a WorkerLedger it is given (worker_ledger.py), which waits out outages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib

from crawler import metrics
from crawler.errors import CrawlerError
from crawler.fetch.worker_ledger import WorkerLedger
from crawler.ledger.chunks import Lease
from crawler.ledger.results import BodyRow, ResultRow

log = logging.getLogger(__name__)


class ResultWriter:
    """`start(tg)` runs the writer in the worker's task group (its failure, the database gone past
    the outage limit, stops the worker); `await close()` flushes what is left and waits for it,
    `terminate()` stops at once, leaving what is buffered to whoever leases its chunks next."""

    def __init__(self, ledger: WorkerLedger, *, batch_size: int, interval: float, lease_seconds: float) -> None:
        self.ledger = ledger
        self.batch_size = batch_size
        self.interval = interval
        self.lease_seconds = lease_seconds
        self._buffer: dict[Lease, list[ResultRow]] = {}
        self._bodies: dict[Lease, list[BodyRow]] = {}
        self._handed: dict[Lease, list[float]] = {}  # when each buffered result came: its write lag
        self._cache_rows: list[tuple] = []
        self._cache_touch: list[bytes] = []
        self._buffered = 0
        self._completed: set[Lease] = set()
        self._lost: set[Lease] = set()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.max_buffer = batch_size * 8
        self.metrics = metrics.for_worker()

    @property
    def lost(self) -> set[Lease]:
        """Leases whose writes were refused by their fence: another worker holds the chunk now."""
        return self._lost

    @property
    def full(self) -> bool:
        return self._buffered >= self.max_buffer

    async def room(self) -> None:
        """Wait until the buffer can take a result (at once, unless the database is behind)."""
        while self._buffered >= self.max_buffer:
            self._room.clear()
            self._wake.set()
            await self._room.wait()

    def add(
        self,
        lease: Lease,
        record: ResultRow,
        body: tuple[str | None, bytes] | None = None,
        remember: tuple | bytes | None = None,
    ) -> None:
        """Buffer one result, after `room()`; with --store-bodies its body (content_type, bytes);
        with --cache-ttl what the cross-job cache learns from it (a row to store, or a fingerprint
        a 304 confirmed)."""
        self._buffer.setdefault(lease, []).append(record)
        if self.metrics.counting:  # when it came, for the write-lag histogram
            self._handed.setdefault(lease, []).append(time.monotonic())
        if body is not None:
            content_type, data = body
            self._bodies.setdefault(lease, []).append(
                BodyRow(record.job_id, record.row_no, content_type, zlib.compress(data, 6))
            )
        if isinstance(remember, tuple):
            self._cache_rows.append(remember)
        elif remember is not None:
            self._cache_touch.append(remember)
        self._buffered += 1
        if self._buffered >= self.batch_size:
            self._wake.set()

    def complete(self, lease: Lease) -> None:
        """The chunk has no more results to come: commit its completion with its last results."""
        self._completed.add(lease)
        self._wake.set()

    def start(self, tg: asyncio.TaskGroup) -> None:
        if self._task is not None:
            raise CrawlerError("the result writer was started twice.")
        self._task = tg.create_task(self.run())

    async def run(self) -> None:
        """Flush on size, on a chunk's completion or every `interval`, until closed and empty."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._buffered or self._completed:
                await self.flush()
            if self._closing and not self._buffered and not self._completed:
                return

    async def close(self) -> None:
        """Flush what is left and wait until it is written (or the writer failed: its error
        stops the task group). Cancelled meanwhile, it terminates: the wait is what was cancelled,
        and a writer left running would outlive its owner."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait([self._task])
        except asyncio.CancelledError:
            self.terminate()
            raise

    def terminate(self) -> None:
        """Stop now: a write under way is abandoned (its transaction rolls back), what is buffered
        is dropped, and the chunks it belonged to are redone by whoever leases them next."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()

    async def flush(self) -> None:
        """Commit what is buffered. While the database is away this waits and retries (the
        buffer stays, `add` blocks when it is full); past the outage limit it raises."""
        batches, completed, bodies, handed = self._buffer, self._completed, self._bodies, self._handed
        self._buffer, self._completed, self._bodies, self._handed = {}, set(), {}, {}
        cache_rows, cache_touch = self._cache_rows, self._cache_touch
        self._cache_rows, self._cache_touch = [], []
        count = sum(len(records) for records in batches.values())
        try:
            refused = await self.ledger.write_results(
                batches, completed, self.lease_seconds, bodies, cache_rows, cache_touch
            )
        except BaseException:
            # Keep the results for the caller's last attempt (or for nobody, if the worker dies:
            # the chunk is then redone by whoever leases it next).
            for lease, records in batches.items():
                self._buffer.setdefault(lease, [])[:0] = records
            for lease, kept in bodies.items():
                self._bodies.setdefault(lease, [])[:0] = kept
            for lease, times in handed.items():
                self._handed.setdefault(lease, [])[:0] = times
            self._cache_rows[:0], self._cache_touch[:0] = cache_rows, cache_touch
            self._completed |= completed
            raise
        for lease in refused:
            log.warning(
                "results for chunk %d refused: its lease (fence %d) was taken over by another worker",
                lease.chunk_no,
                lease.fence,
            )
        self._lost |= refused
        self.metrics.results_written(t for lease, times in handed.items() if lease not in refused for t in times)
        self._buffered -= count
        self._room.set()
