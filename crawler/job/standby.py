"""Starting a worker process, before its job exists.

A worker spends ~0.3 s of CPU importing its modules (aiohttp the largest) before it can fetch.
The CLI starts this machine's workers as its first act, so that they import while the supervisor
imports its own modules and prepares the database and the job; the supervisor then sends each
one its order. A worker started later (a restart, `crawler worker`) is sent its order at once.

Kept free of the crawler's other modules: the CLI imports it before them.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

CONTEXT = multiprocessing.get_context("spawn")


def worker_main(orders: Connection) -> None:
    """A worker process's entry point: import, then wait for the order (dsn, job id, settings,
    environment); the end of the pipe instead means the crawl stopped before it had a job."""
    # Our own process group from the start: a Ctrl-C at the terminal reaches the supervisor
    # alone, which turns it into one orderly drain signal per worker.
    os.setpgrp()
    from crawler.fetch.process import run_worker

    try:
        dsn, job_id, settings, environ = orders.recv()
    except EOFError:
        return
    finally:
        orders.close()
    # The supervisor's environment as it is now, as if this process had been started now: some
    # of it is set after the workers start (the metrics directory of --metrics-port).
    os.environ.clear()
    os.environ.update(environ)
    run_worker(dsn, job_id, settings)


def spawn_worker(index: int) -> tuple[BaseProcess, Connection]:
    """A new worker process, and the end of the pipe its order goes into."""
    orders, sender = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=worker_main, args=(orders,), name=f"crawler-worker-{index}", daemon=False)
    process.start()
    orders.close()  # the child's end
    return process, sender


def send_order(sender: Connection, dsn: str, job_id: int, settings: dict) -> None:
    """Give a worker its job. One that died before it could read it is left to the caller's
    watch over its exit code."""
    try:
        sender.send((dsn, job_id, settings, dict(os.environ)))
    except OSError:
        pass
    finally:
        sender.close()


class Standby:
    """`count` worker processes started now, waiting for their job: `with Standby(n) as s:`;
    WorkerProcesses.start() takes them; those never taken are ended when the block ends."""

    def __init__(self, count: int) -> None:
        self.waiting = [spawn_worker(index) for index in range(count)]

    def take(self, count: int) -> list[tuple[BaseProcess, Connection]]:
        """Up to `count` of the waiting processes, now the caller's; the others are ended."""
        taken, self.waiting = self.waiting[:count], self.waiting[count:]
        self.close()
        return taken

    def close(self) -> None:
        for process, sender in self.waiting:
            sender.close()
            process.terminate()  # importing, or waiting: it has nothing to drain
            process.join()
        self.waiting = []

    def __enter__(self) -> Standby:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
