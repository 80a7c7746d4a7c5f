"""Gives the worker's freed heap memory back to the system, so that its resident memory follows
what it holds now rather than everything it has held.

Why: each TLS connection (uvloop's SSL protocol) mallocs a 256 KiB read buffer, and each TLS read
a 256 KiB bytes object that is then shrunk. glibc serves such blocks from its heap once one has
been freed (its mmap threshold rises), and never gives a freed block's pages back unless they are
at the heap's top. Over a crawl of one connection per request the freed blocks land all over the
heap, and pages that a buffer touched stay resident after it is freed: one worker, 75 000 URLs over
30 000 TLS hosts, grew from 250 to 375 MiB while what malloc had handed out stayed flat (~380 MiB,
mostly buffers' untouched pages; benchmarks/worker_memory.py), and held 150-170 MiB with a trim
every 5 s. malloc_trim(0) returns every free page of every
arena (madvise), not only the top; the worker calls it now and then (fetcher.Fetcher's watchdog).

Only glibc has it: elsewhere trim() does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time


def _malloc_trim():  # noqa: ANN202 - a ctypes function, or None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class HeapTrimmer:
    """Trims at most once per `interval` seconds, when `due(now)` is asked; counts its trims and
    the time they took (5-20 ms for a heap with 200-350 MiB free, measured in that worker)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = time.perf_counter()
        self.trims = 0
        self.seconds = 0.0

    def due(self, now: float) -> bool:
        return self.interval > 0 and now - self.last >= self.interval

    def trim(self, now: float) -> None:
        self.last = now
        started = time.perf_counter()
        if trim():
            self.trims += 1
            self.seconds += time.perf_counter() - started
