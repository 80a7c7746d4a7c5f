"""A worker process: its signal handlers (the only place a worker installs any), its collaborators
opened and wired for a Worker (open_worker), and its run from the orders the supervisor sent
(run_worker; the process's entry point is job/standby.worker_main). The Worker itself, which is
given everything it uses, is fetch/worker.py. Processes and what each owns: docs/ARCHITECTURE.md."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator

from crawler.errors import CrawlerError
from crawler.fetch.fetcher import Fetcher
from crawler.fetch.worker import Worker, host_scheduler, worker_id
from crawler.fetch.worker_ledger import LedgerAccess
from crawler.fetch.writer import ResultWriter
from crawler.ledger.database import LedgerConnection
from crawler.ledger.results import prepare_writer
from crawler.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_worker(
    dsn: str, job_id: int, settings: Settings, *, stop: asyncio.Event | None = None
) -> AsyncIterator[Worker]:
    """A Worker for a real process: three ledger connections (the feed's, the heartbeat's, the
    writer's), the fetcher's session, the host scheduler and, with --robots obey, the robots gate,
    opened here and closed at the block's end, whatever ends it."""
    limit = settings.db_outage_limit
    async with (
        LedgerConnection(dsn, outage_limit=limit, job=job_id) as db,
        LedgerConnection(dsn, outage_limit=limit, job=job_id) as beat_db,
        LedgerConnection(dsn, outage_limit=limit, setup=prepare_writer, job=job_id) as writer_db,
        Fetcher(settings) as fetcher,
    ):
        hosts = host_scheduler(settings)
        if settings.idle_hosts == 0:  # a host with nothing left: its connections go at once
            hosts.on_idle = fetcher.release_host
        writer = ResultWriter(LedgerAccess(writer_db, job_id), **settings.writer._asdict())
        robots = None
        if settings.robots == "obey":
            from crawler.fetch.robots_gate import RobotsGate

            robots = functools.partial(RobotsGate, dsn, job_id)
        yield Worker(
            settings,
            job_id,
            ledger=LedgerAccess(db, job_id),
            beat=LedgerAccess(beat_db, job_id),
            writer=writer,
            fetcher=fetcher,
            hosts=hosts,
            robots=robots,
            stop=stop,
        )


def tune_gc() -> None:
    """Fewer, cheaper garbage collections in a worker: what was allocated at start-up (modules,
    the session, the connections) is frozen out of the collector's scans, and the young
    generation is collected every 10 000 allocations instead of 700. A worker's garbage is short
    lived and acyclic (its per-request objects die by reference count); the cycles aiohttp and
    asyncio leave behind (exceptions with tracebacks) are still collected."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def run_worker(dsn: str, job_id: int, settings: dict) -> None:
    """A worker process's work once it has its job (its entry point is standby.worker_main)."""
    import uvloop

    from crawler.logs import log_context, setup_worker_logging

    os.setpgrp()  # as standby.worker_main does first: Ctrl-C is the supervisor's to turn into a drain
    setup_worker_logging()
    tune_gc()
    worker_settings = Settings.from_values(settings, "the worker's orders")
    name = worker_id()
    parent = os.getppid()

    async def main() -> None:
        stop = asyncio.Event()
        async with drain_on_signals(stop, parent), open_worker(dsn, job_id, worker_settings, stop=stop) as worker:
            await worker.run()

    try:
        with log_context(job=job_id, worker=name):  # every record of this process carries both
            uvloop.run(main())
    except (CrawlerError, BaseExceptionGroup) as exc:
        # e.g. the database gone past its outage limit: one line, no traceback. From inside the
        # task group it comes wrapped in an exception group.
        found = exc if isinstance(exc, CrawlerError) else _first_crawler_error(exc)
        if found is None:
            raise
        log.error("worker %s stops: %s", name, found)
        raise SystemExit(found.exit_code) from None


@contextlib.asynccontextmanager
async def drain_on_signals(stop: asyncio.Event, parent: int) -> AsyncIterator[None]:
    """Within the block, SIGINT / SIGTERM and the parent's death set `stop` (the worker's drain);
    a second signal ends the process at once."""
    loop = asyncio.get_running_loop()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        stop.set()
        if presses > 1:  # a second Ctrl-C: stop at once; committed results are safe
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    async def orphan_watch() -> None:
        # A supervisor killed with SIGKILL cannot tell us: drain when we are orphaned.
        # noqa reason: nothing tells a process its parent died, so it looks once a second.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(1.0)
        stop.set()

    watch = asyncio.create_task(orphan_watch())
    try:
        yield
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch  # ended before the block's caller goes on, not left pending


def _first_crawler_error(group: BaseExceptionGroup) -> CrawlerError | None:
    for exc in group.exceptions:
        if isinstance(exc, CrawlerError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (inner := _first_crawler_error(exc)):
            return inner
    return None
