"""The worker's freed heap goes back to the system: the pattern a crawl of one TLS connection per
request leaves in glibc's heap (256 KiB buffers freed between blocks still in use) costs resident
memory until trimmed, and the fetcher trims while it runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

import crawler.fetch.fetcher as fetcher_module
from conftest import test_settings
from crawler.fetch import heap
from crawler.fetch.fetcher import Fetcher

# Run in a fresh interpreter, so that the heap holds this pattern and not the test run's own.
FRAGMENTED_HEAP = r"""
import json, os, sys
from crawler.fetch import heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

BUFFER = 256 * 1024  # uvloop's TLS read buffer, and each TLS read's bytes object
first = bytearray(BUFFER)
del first  # glibc's mmap threshold rises past it: the next buffers come from the heap
buffers, kept = [], []
for i in range(400):
    block = bytearray(BUFFER)
    block[::4096] = b"x" * len(block[::4096])  # every page touched, as reads fill a buffer over time
    buffers.append(block)
    kept.append(bytes(1024 + i % 7))  # a small block from malloc between two buffers, still in use
del buffers, block  # the connections closed; what was allocated between them is still held
freed = rss()
trimmed = heap.trim()
print(json.dumps({"freed": freed, "after_trim": rss(), "trimmed": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_a_trim_gives_freed_buffers_pages_back_where_free_alone_keeps_them():
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60, check=True
    )
    figures = json.loads(done.stdout)
    if not figures["trimmed"]:
        pytest.skip("this C library has no malloc_trim")
    # 400 buffers of 256 KiB = 100 MiB freed: free() alone left most of it resident (the pages are
    # not at the heap's top), the trim gives nearly all of it back.
    assert figures["freed"] - figures["after_trim"] > 80 * 2**20, figures


def test_the_trimmer_is_due_once_per_interval():
    trimmer = heap.HeapTrimmer(5.0)
    start = trimmer.last
    assert not trimmer.due(start + 4.9)
    assert trimmer.due(start + 5.0)
    trimmer.trim(start + 5.0)
    assert not trimmer.due(start + 9.9) and trimmer.due(start + 10.0)
    assert not heap.HeapTrimmer(0.0).due(start + 1e6)  # 0: never


async def test_the_fetcher_trims_the_heap_while_it_runs(monkeypatch):
    if not heap.trim():
        pytest.skip("this C library has no malloc_trim")
    monkeypatch.setattr(fetcher_module, "HEAP_TRIM_INTERVAL", 0.05)
    async with Fetcher(test_settings(read_timeout=1.0, total_timeout=1.0)) as fetcher:
        deadline = time.monotonic() + 10
        while fetcher.heap.trims < 3:
            assert time.monotonic() < deadline, "the fetcher did not trim the heap within 10 s"
            await asyncio.sleep(0.01)
