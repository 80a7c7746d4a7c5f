"""`crawler bench`: a load test of the whole path on this machine. Starts the mock server,
generates N URLs as a CSV, crawls it into the database and prints the job's figures with what the
run cost: requests/s, latency, CPU per 1 000 requests, peak RSS per process, rows/s written and
the time to the first request.

It only ever targets the mock server it started, on loopback.
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
from rich.console import Console
from rich.table import Table

from crawler import registry
from crawler.crawl import crawl
from crawler.database import connect
from crawler.errors import CrawlerError
from crawler.settings import Settings
from crawler.standby import Standby


def duplicate_rows(count: int, duplicates: float) -> int:
    """How many of `count` generated rows repeat an earlier one: exactly this many, always."""
    return round(count * duplicates)


def host_base(base: str, host: int, hosts: int) -> str:
    """The server's base URL as host number `host` of `hosts` names it: with more than one, the
    name h<host>.localhost, which aiodns (c-ares) resolves to loopback as RFC 6761 says; one
    server, as many hosts as the crawler's per-host state and robots.txt see."""
    return base if hosts <= 1 else base.replace("://127.0.0.1:", f"://h{host}.localhost:", 1)


def write_urls(path: Path, base: str, count: int, duplicates: float, latency_ms: int, seed: int = 1,
               hosts: int = 1) -> None:
    """A CSV of `count` URLs, `duplicate_rows(count, duplicates)` of them repeating earlier ones,
    taking turns over `hosts` hosts.

    The duplicates are spread evenly through the file (as in a real export, not all at its end),
    each repeating a random earlier unique URL; the same arguments always give the same file.
    """
    rng = random.Random(seed)
    dups = duplicate_rows(count, duplicates)
    if hosts > 1:
        tail = f"/delay/{latency_ms}" if latency_ms > 0 else "/ok"
        with path.open("w") as out:
            out.write("url\n")
            unique = 0
            for i in range(count):
                n = rng.randrange(unique) if (i + 1) * dups // count > i * dups // count else unique
                unique += n == unique
                out.write(f"{host_base(base, n % hosts, hosts)}{tail}/{n}\n")
        return
    prefix = f"{base}/delay/{latency_ms}" if latency_ms > 0 else f"{base}/ok"
    unique = 0
    with path.open("w") as out:
        out.write("url\n")
        for i in range(count):
            # Row i repeats an earlier URL when the running share of duplicates steps up here:
            # integer arithmetic, so the total is exactly `dups` and row 0 is never a repeat.
            if (i + 1) * dups // count > i * dups // count:
                out.write(f"{prefix}/{rng.randrange(unique)}\n")
            else:
                out.write(f"{prefix}/{unique}\n")
                unique += 1


class MockServerProcess:
    """The mock server as a child process, for the length of a `with` block."""

    def __init__(self, processes: int, robots: str = "none") -> None:
        self.processes = processes
        self.robots = robots
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "MockServerProcess":
        # --no-path-hits: a load test's millions of distinct paths would each cost the server
        # memory; the total of hits (what benchmarks read) is still counted.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crawler.mock_server", "--port", "0", "--processes", str(self.processes),
             "--no-path-hits", "--robots", self.robots],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.__exit__()
            raise CrawlerError("the mock server did not start; run `crawler mock-server` to see why.")
        self.url = line.split("listening on ", 1)[1].split()[0]
        return self

    def hits(self) -> dict:
        """The server's hit counts (/__hits): the total, and robots.txt's among the counted paths."""
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with direct.open(f"{self.url}/__hits", timeout=10) as answer:
            return orjson.loads(answer.read())

    def cpu_seconds(self) -> float | None:
        """CPU time of the server and its child processes so far (it shares the machine)."""
        if self.proc is None:
            return None
        try:
            root = psutil.Process(self.proc.pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
            return total
        except psutil.Error:
            return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


async def measure(dsn: str, job_id: int, *, elapsed_s: float, supervisor_cpu_s: float,
                  supervisor_peak_rss: int) -> dict:
    """The bench figures of a finished job, from the ledger and the supervisor's own usage."""
    conn = await connect(dsn)
    try:
        job = await conn.fetchrow(
            "SELECT extract(epoch FROM first_fetch_at - created_at) AS to_first,"
            " extract(epoch FROM finished_at - first_fetch_at) AS fetch_to_finish"
            " FROM jobs WHERE id = $1",
            job_id,
        )
        results = await conn.fetchrow(
            "SELECT count(*) AS rows, count(*) FILTER (WHERE NOT from_cache) AS fetched,"
            " extract(epoch FROM max(fetched_at) FILTER (WHERE NOT from_cache)"
            "   - (SELECT first_fetch_at FROM jobs WHERE id = $1)) AS fetch_window,"
            " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY elapsed_ms)"
            "   FILTER (WHERE NOT from_cache) AS latency"
            " FROM results WHERE job_id = $1",
            job_id,
        )
        workers = await conn.fetch(
            "SELECT worker_id, fetched, peak_rss_bytes, cpu_seconds FROM workers WHERE job_id = $1 ORDER BY started_at",
            job_id,
        )
    finally:
        await conn.close()
    fetched = results["fetched"]
    worker_cpu = sum(float(w["cpu_seconds"] or 0.0) for w in workers)
    total_cpu = worker_cpu + supervisor_cpu_s
    latency = results["latency"] or [None, None, None]
    window = float(results["fetch_window"]) if results["fetch_window"] is not None else None
    to_finish = float(job["fetch_to_finish"]) if job["fetch_to_finish"] is not None else None
    return {
        "requests_per_s": round(fetched / elapsed_s, 1) if elapsed_s > 0 else None,
        "fetch_rate_per_s": round(fetched / window, 1) if window else None,
        "latency_ms": {"p50": latency[0], "p95": latency[1], "p99": latency[2]},
        "cpu_s_per_1000_requests": round(1000 * total_cpu / fetched, 4) if fetched else None,
        "cpu_s": {"supervisor": round(supervisor_cpu_s, 3), "workers": round(worker_cpu, 3)},
        "peak_rss_bytes": {
            "supervisor": supervisor_peak_rss,
            "workers": [int(w["peak_rss_bytes"] or 0) for w in workers],
        },
        "rows_written_per_s": round(results["rows"] / to_finish, 1) if to_finish else None,
        "time_to_first_request_s": round(float(job["to_first"]), 3) if job["to_first"] is not None else None,
        "workers": [
            {"worker": w["worker_id"], "fetched": w["fetched"], "peak_rss_bytes": w["peak_rss_bytes"],
             "cpu_s": round(float(w["cpu_seconds"] or 0.0), 3)}
            for w in workers
        ],
    }


def render_bench(figures: dict, console: Console) -> None:
    def mib(n: int | None) -> str:
        return "?" if n is None else f"{n / 2**20:.0f} MiB"

    def num(x, fmt: str = ",.0f") -> str:
        return "?" if x is None else format(x, fmt)

    lat = figures["latency_ms"]
    rss = figures["peak_rss_bytes"]
    table = Table(title="bench", show_header=False)
    table.add_row("requests/s (end to end)", num(figures["requests_per_s"]))
    table.add_row("requests/s (while fetching)", num(figures["fetch_rate_per_s"]))
    if lat["p50"] is not None:
        table.add_row("latency p50/p95/p99", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms")
    cpu = figures["cpu_s"]
    table.add_row("CPU s per 1 000 requests", f"{num(figures['cpu_s_per_1000_requests'], '.3f')}"
                  f" (supervisor {cpu['supervisor']:.1f} s, workers {cpu['workers']:.1f} s)")
    if figures.get("mock_server_cpu_s") is not None:
        table.add_row("mock server CPU s", f"{figures['mock_server_cpu_s']:.1f}")
    table.add_row("peak RSS supervisor", mib(rss["supervisor"]))
    table.add_row("peak RSS workers", ", ".join(mib(n) for n in rss["workers"]) or "?")
    table.add_row("rows/s written", num(figures["rows_written_per_s"]))
    table.add_row("time to first request", f"{num(figures['time_to_first_request_s'], '.3f')} s")
    console.print(table)


async def bench(dsn: str, settings: Settings, *, urls: int, duplicates: float, latency_ms: int,
                server_processes: int, summary_json: str | None, quiet: bool, standby: Standby | None = None,
                hosts: int = 1) -> int:
    if not 0 <= duplicates < 1:
        raise CrawlerError("--duplicates must be a fraction from 0 up to (not including) 1.")
    if urls < 1:
        raise CrawlerError("--urls must be at least 1.")
    settings.allow_net = sorted(set(settings.allow_net) | {"127.0.0.1/32"})
    # A robots.txt with rules that the generated paths pass: what obeying costs, every row fetched.
    with (tempfile.TemporaryDirectory(prefix="crawler-bench-") as tmp,
          MockServerProcess(server_processes, robots="disallow") as server):
        path = Path(tmp) / "urls.csv"
        write_urls(path, server.url, urls, duplicates, latency_ms, hosts=hosts)
        if not quiet:
            print(f"bench: {urls} URLs ({duplicates:.0%} duplicates, {latency_ms} ms latency) against {server.url}",
                  file=sys.stderr)
        # The crawl writes its summary here; the bench figures are added to it below.
        crawl_summary = Path(tmp) / "summary.json"
        server_cpu_before = server.cpu_seconds()
        before = resource.getrusage(resource.RUSAGE_SELF)
        code = await crawl(dsn, settings, input_path=str(path), url_column=None,
                           job_name=f"bench-{int(time.time())}-{os.getpid()}", summary_json=str(crawl_summary),
                           quiet=quiet, standby=standby)
        after = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu_after = server.cpu_seconds()
        if not crawl_summary.exists():
            return code
        summary = orjson.loads(crawl_summary.read_bytes())
        figures = await measure(dsn, summary["job_id"], elapsed_s=summary["elapsed_s"], supervisor_cpu_s=_cpu(after) - _cpu(before),
                                supervisor_peak_rss=registry.peak_rss_bytes())
        if server_cpu_before is not None and server_cpu_after is not None:
            figures["mock_server_cpu_s"] = round(server_cpu_after - server_cpu_before, 3)
        hits = server.hits()
        figures["server_requests"] = hits["total"]
        figures["robots_txt_requests"] = hits["paths"].get("/robots.txt", 0)
        summary["bench"] = figures
    if summary_json:
        Path(summary_json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if not quiet:
        render_bench(figures, Console())
    return code
