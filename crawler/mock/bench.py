"""`crawler bench`: a load test of the whole path on this machine. Starts the mock server,
generates N URLs as a CSV, crawls it into the database and prints the job's figures with what the
run cost: requests/s, latency, CPU per 1 000 requests, peak RSS per process, rows/s written and
the time to the first request.

With --hosts N the URLs are spread over N host names (h0.bench.test ...) as in a shuffled list:
each host has its even share of the URLs, at random places in the file; a DNS responder the bench starts on
loopback answers every name with 127.0.0.1 and the crawl resolves through it (--dns-server).
With --tls the mock server serves HTTPS and the crawl trusts its CA (--ca-file). The figures then
add the new connections and TLS handshakes per second (counted by the server), the DNS
questions per name, and the largest crawler process's peak memory.

It only ever targets the mock server it started, on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import orjson
import psutil
from rich.console import Console
from rich.table import Table

from crawler.errors import CrawlerError
from crawler.job.crawl import crawl
from crawler.job.standby import Standby
from crawler.ledger import registry
from crawler.ledger.database import connection
from crawler.ledger.jobs import fetch_timing
from crawler.mock.tls import BENCH_ZONE
from crawler.settings import Settings


def duplicate_rows(count: int, duplicates: float) -> int:
    """How many of `count` generated rows repeat an earlier one: exactly this many, always."""
    return round(count * duplicates)


def host_bases(base: str, hosts: int | None) -> list[str]:
    """The base URLs to spread rows over: `base` itself, or `hosts` names of the bench's zone on
    its scheme and port ('https://h7.bench.test:8443')."""
    if not hosts:
        return [base]
    scheme, _, authority = base.partition("://")
    port = authority.rsplit(":", 1)[1]
    return [f"{scheme}://h{i}.{BENCH_ZONE}:{port}" for i in range(hosts)]


def write_urls(
    path: Path, base: str, count: int, duplicates: float, latency_ms: int, seed: int = 1, hosts: int | None = None
) -> None:
    """A CSV of `count` URLs, `duplicate_rows(count, duplicates)` of them repeating earlier ones.

    The duplicates are spread evenly through the file (as in a real export, not all at its end),
    each repeating a random earlier unique URL; the same arguments always give the same file.
    With `hosts`, the unique URLs are dealt to the hosts (see host_bases) in an even share each,
    in a random order: a shuffled list. Not unique URL n on host n mod `hosts`: a process that
    takes every k-th row, as the bare scripts the crawler is measured against do, would then meet
    only its own hosts (with even counts), which no real list gives it.
    """
    rng = random.Random(seed)
    dups = duplicate_rows(count, duplicates)
    tail = f"/delay/{latency_ms}" if latency_ms > 0 else "/ok"
    prefixes = [f"{b}{tail}" for b in host_bases(base, hosts)]
    host_of = list(range(count - dups))  # unique URL n's host, before the modulo
    if len(prefixes) > 1:
        random.Random(seed + 1).shuffle(host_of)
    unique = 0
    with path.open("w") as out:
        out.write("url\n")
        for i in range(count):
            # Row i repeats an earlier URL when the running share of duplicates steps up here:
            # integer arithmetic, so the total is exactly `dups` and row 0 is never a repeat.
            if (i + 1) * dups // count > i * dups // count:
                n = rng.randrange(unique)
            else:
                n, unique = unique, unique + 1
            out.write(f"{prefixes[host_of[n] % len(prefixes)]}/{n}\n")


class LoopbackProcess:
    """A server of the bench's (the mock server, the DNS responder) as a child process, for the
    length of a `with` block: it names where it listens on its first line, and prints JSON lines
    of what it counted when it stops (`reports`)."""

    name = "server"

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.reports: list[dict] = []

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen([sys.executable, *self.args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.__exit__()
            raise CrawlerError(f"the {self.name} did not start; run `python {' '.join(self.args)}` to see why.")
        self.url = line.split("listening on ", 1)[1].split()[0]
        return self

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
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.reports = [orjson.loads(line) for line in (out or "").splitlines() if line.startswith("{")]


class MockServerProcess(LoopbackProcess):
    name = "mock server"

    def __init__(self, processes: int, ca_file: Path | None = None, robots: str = "none") -> None:
        # --no-path-hits: a load test's millions of distinct paths would each cost the server
        # memory; the total of hits (what benchmarks read) is still counted.
        self.processes = processes
        self.robots = robots
        self.ca_file = ca_file
        tls = ["--tls", "--ca-out", str(ca_file)] if ca_file is not None else []
        super().__init__(
            [
                "-m",
                "crawler.mock.server",
                "--port",
                "0",
                "--processes",
                str(processes),
                "--no-path-hits",
                "--report",
                "--robots",
                robots,
                *tls,
            ]
        )

    def hits(self) -> dict:
        """The server's hit counts (/__hits): the total, and robots.txt's among the counted paths."""
        import ssl
        import urllib.request

        handlers: list = [urllib.request.ProxyHandler({})]  # loopback: never a proxy
        if self.ca_file is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.ca_file))))
        with urllib.request.build_opener(*handlers).open(f"{self.url}/__hits", timeout=10) as answer:
            return orjson.loads(answer.read())

    def connections(self) -> int | None:
        """Connections accepted, by every process of the server (known once it has stopped)."""
        return sum(r["connections"] for r in self.reports) if self.reports else None


class DNSResponderProcess(LoopbackProcess):
    name = "DNS responder"

    def __init__(self) -> None:
        super().__init__(["-m", "crawler.mock.dns_responder", "--zone", BENCH_ZONE, "--port", "0"])


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


async def measure(
    dsn: str, job_id: int, *, elapsed_s: float, supervisor_cpu_s: float, supervisor_peak_rss: int
) -> dict:
    """The bench figures of a finished job, from the ledger and the supervisor's own usage."""
    async with connection(dsn) as conn:
        job, results = await fetch_timing(conn, job_id)
        workers = await registry.worker_usage(conn, job_id)
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
            {
                "worker": w["worker_id"],
                "fetched": w["fetched"],
                "peak_rss_bytes": w["peak_rss_bytes"],
                "cpu_s": round(float(w["cpu_seconds"] or 0.0), 3),
            }
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
    table.add_row(
        "CPU s per 1 000 requests",
        f"{num(figures['cpu_s_per_1000_requests'], '.3f')}"
        f" (supervisor {cpu['supervisor']:.1f} s, workers {cpu['workers']:.1f} s)",
    )
    if figures.get("mock_server_cpu_s") is not None:
        table.add_row("mock server CPU s", f"{figures['mock_server_cpu_s']:.1f}")
    table.add_row("peak RSS supervisor", mib(rss["supervisor"]))
    table.add_row("peak RSS workers", ", ".join(mib(n) for n in rss["workers"]) or "?")
    if figures.get("largest_process_rss_bytes") is not None:
        table.add_row("largest crawler process", mib(figures["largest_process_rss_bytes"]))
    if figures.get("connections"):
        conns = figures["connections"]
        table.add_row(
            "new connections",
            f"{conns['new']:,} ({num(conns['new_per_s'])}/s, TLS handshakes {num(conns['tls_handshakes_per_s'])}/s)",
        )
    if figures.get("dns"):
        dns = figures["dns"]
        table.add_row(
            "DNS questions",
            f"{dns['questions']:,} for {dns['names_asked']:,} names ({dns['questions_per_name']} per host name)",
        )
    table.add_row("rows/s written", num(figures["rows_written_per_s"]))
    table.add_row("time to first request", f"{num(figures['time_to_first_request_s'], '.3f')} s")
    console.print(table)


async def bench(
    dsn: str,
    settings: Settings,
    *,
    urls: int,
    duplicates: float,
    latency_ms: int,
    server_processes: int,
    summary_json: str | None,
    quiet: bool,
    standby: Standby | None = None,
    hosts: int | None = None,
    tls: bool = False,
) -> int:
    if not 0 <= duplicates < 1:
        raise CrawlerError("--duplicates must be a fraction from 0 up to (not including) 1.")
    if urls < 1:
        raise CrawlerError("--urls must be at least 1.")
    if hosts is not None and hosts <= 1:
        hosts = None  # one host: 127.0.0.1 itself, no name to resolve
    # The caller's settings stay as they are: the bench's own (its servers on loopback) are a new object.
    settings = dataclasses.replace(settings, allow_net=sorted(set(settings.allow_net) | {"127.0.0.1/32"}))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crawler-bench-")))
        ca_file = tmp / "mock-ca.pem" if tls else None
        # A robots.txt with rules that the generated paths pass: what obeying costs, every row fetched.
        server = stack.enter_context(MockServerProcess(server_processes, ca_file, robots="disallow"))
        responder = stack.enter_context(DNSResponderProcess()) if hosts else None
        if ca_file is not None:
            settings = dataclasses.replace(settings, ca_file=str(ca_file))
        if responder is not None:
            settings = dataclasses.replace(settings, dns_servers=[responder.url])
        path = tmp / "urls.csv"
        write_urls(path, server.url, urls, duplicates, latency_ms, hosts=hosts)
        if not quiet:
            spread = f" over {hosts} host names" if hosts else ""
            print(
                f"bench: {urls} URLs{spread} ({duplicates:.0%} duplicates, {latency_ms} ms latency) against "
                f"{server.url}",
                file=sys.stderr,
            )
        # The crawl writes its summary here; the bench figures are added to it below.
        crawl_summary = tmp / "summary.json"
        server_cpu_before = server.cpu_seconds()
        before = resource.getrusage(resource.RUSAGE_SELF)
        code = await crawl(
            dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name=f"bench-{int(time.time())}-{os.getpid()}",
            summary_json=str(crawl_summary),
            quiet=quiet,
            standby=standby,
        )
        after = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu_after = server.cpu_seconds()
        if not crawl_summary.exists():
            return code
        summary = orjson.loads(crawl_summary.read_bytes())
        figures = await measure(
            dsn,
            summary["job_id"],
            elapsed_s=summary["elapsed_s"],
            supervisor_cpu_s=_cpu(after) - _cpu(before),
            supervisor_peak_rss=registry.peak_rss_bytes(),
        )
        if server_cpu_before is not None and server_cpu_after is not None:
            figures["mock_server_cpu_s"] = round(server_cpu_after - server_cpu_before, 3)
        hits = server.hits()
        figures["server_requests"] = hits["total"]
        figures["robots_txt_requests"] = hits["paths"].get("/robots.txt", 0)
    # Both servers have stopped (the ExitStack) and printed what they counted.
    figures.update(
        shape_figures(
            figures,
            elapsed_s=summary["elapsed_s"],
            hosts=hosts,
            tls=tls,
            connections=server.connections(),
            dns=responder.reports[0] if responder is not None and responder.reports else None,
        )
    )
    summary["bench"] = figures
    if summary_json:
        # noqa reason: one small file, once, after the run, when nothing else waits on the loop.
        Path(summary_json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))  # noqa: ASYNC240
    if not quiet:
        render_bench(figures, Console())
    return code


def shape_figures(
    figures: dict, *, elapsed_s: float, hosts: int | None, tls: bool, connections: int | None, dns: dict | None
) -> dict:
    """What the many-host shape costs: connections and handshakes per second, DNS questions per
    name, and the largest crawler process (the supervisor or a worker)."""
    rss = figures["peak_rss_bytes"]
    per_s = (lambda n: round(n / elapsed_s, 1)) if elapsed_s > 0 else (lambda n: None)
    shape = {
        "hosts": hosts or 1,
        "tls": tls,
        "largest_process_rss_bytes": max([rss["supervisor"] or 0, *rss["workers"]]),
        "connections": None
        if connections is None
        else {
            "new": connections,
            "new_per_s": per_s(connections),
            "tls_handshakes_per_s": per_s(connections) if tls else 0.0,
        },
        "dns": None,
    }
    if dns is not None:
        names = hosts or 1
        shape["dns"] = {
            "questions": dns["queries"],
            "names_asked": dns["names"],
            "questions_per_name": round(dns["queries"] / names, 2),
        }
    return shape
