"""The supervisor process's signal handlers: installed here and nowhere else in that process (a
worker's are installed by fetch/process.py's run_worker, the mock servers' by their own main). What
each signal does in each process: docs/ARCHITECTURE.md.

Handlers are the event loop's (add_signal_handler), set for a block and removed at its end, when
SIGINT is the interpreter's KeyboardInterrupt again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop(callback: Callable[[], object]) -> Iterator[None]:
    """SIGINT and SIGTERM call `callback` (on the running loop) while the block runs. A block
    inside another replaces the outer handlers, with no gap between."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def unless_signalled(work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None once SIGINT or SIGTERM comes first. For what follows a crawl:
    the summary scans the whole job, and Ctrl-C then skips it, where the interpreter's own
    handler would end the process without saying how the job stands."""
    task = asyncio.ensure_future(work)
    with on_stop(task.cancel):  # replaces the supervisor's, with no gap between
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this coroutine was cancelled, not just the work
            return None
