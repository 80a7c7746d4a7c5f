"""`crawler bench`: a load test of the whole path on this machine. Starts the mock server,
generates N URLs as a CSV, crawls it into the database and prints the job's figures.

It only ever targets the mock server it started, on loopback.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from crawler.crawl import crawl
from crawler.errors import CrawlerError
from crawler.settings import Settings


def write_urls(path: Path, base: str, count: int, duplicates: float, latency_ms: int, seed: int = 1) -> None:
    """A CSV of `count` URLs, a `duplicates` fraction of them repeating earlier ones."""
    rng = random.Random(seed)
    unique = max(1, round(count * (1 - duplicates)))
    prefix = f"{base}/delay/{latency_ms}" if latency_ms > 0 else f"{base}/ok"
    with path.open("w") as out:
        out.write("url\n")
        for i in range(count):
            n = i if i < unique else rng.randrange(unique)
            out.write(f"{prefix}/{n}\n")


class MockServerProcess:
    """The mock server as a child process, for the length of a `with` block."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "MockServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crawler.mock_server", "--port", "0", "--processes", str(self.processes)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.__exit__()
            raise CrawlerError("the mock server did not start; run `crawler mock-server` to see why.")
        self.url = line.split("listening on ", 1)[1].split()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def bench(dsn: str, settings: Settings, *, urls: int, duplicates: float, latency_ms: int,
                server_processes: int, summary_json: str | None, quiet: bool) -> int:
    if not 0 <= duplicates < 1:
        raise CrawlerError("--duplicates must be a fraction from 0 up to (not including) 1.")
    settings.allow_net = sorted(set(settings.allow_net) | {"127.0.0.1/32"})
    with tempfile.TemporaryDirectory(prefix="crawler-bench-") as tmp, MockServerProcess(server_processes) as server:
        path = Path(tmp) / "urls.csv"
        write_urls(path, server.url, urls, duplicates, latency_ms)
        if not quiet:
            print(f"bench: {urls} URLs ({duplicates:.0%} duplicates, {latency_ms} ms latency) against {server.url}",
                  file=sys.stderr)
        return await crawl(dsn, settings, input_path=str(path), url_column=None,
                           job_name=f"bench-{int(time.time())}-{os.getpid()}", summary_json=summary_json,
                           quiet=quiet)
