"""Duplicates and the request cache: the same N-row job (`crawler bench`, CSV -> PostgreSQL against
the mock server) with 30 % of its rows repeating earlier ones and with none, side by side:

    python benchmarks/duplicates.py [--urls 1000000] [--runs 1]

Figures per case: rows, unique requests, the requests the mock server received (its own count,
read from its /__hits once every chunk is done, before the bench stops it), cache hits, elapsed,
requests/s, and the peak RSS of the supervisor and the largest worker (getrusage, reported by the
crawler itself; the bench is started from a fresh shell so that its figure is not this script's).
The target: peak RSS with duplicates within 10 % of the same job without. Each run is in a
scratch database emptied before it (so no run is served from an earlier run's responses). Every
request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path

import aiohttp
import asyncpg
import psutil

import harness

TARGET = 1.10  # peak RSS with duplicates / without
# getrusage's peak RSS of a process is at least the peak of the process it was started from (Linux
# keeps the larger across exec), and the bench reports its supervisor's from getrusage. Started
# from this process (~50 MiB of imports, more once it has read anything large), the bench would
# report this process's peak whenever it is larger; started from a shell's fresh fork, its own.
FRESH_START = ["/bin/sh", "-c", '"$@" & wait $!', "sh"]
HITS_TOTAL = re.compile(rb'\{\s*"total":\s*(\d+)\s*,')

# Every chunk of the job is done: every request has had its answer. (The database is emptied
# before each run, so the one job there is this run's.)
FETCHED_ALL = (
    "SELECT j.ingest_done"
    " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id AND c.state <> 'done') FROM jobs j"
)


def mock_server_url() -> str | None:
    """The loopback address of the mock server a `crawler bench` started under this process."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if "crawler.mock.server" not in " ".join(proc.cmdline()):
                continue
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                    return f"http://127.0.0.1:{conn.laddr.port}"
        except psutil.Error:
            continue
    return None


class ServerHits(harness.Watcher):
    """What the bench's mock server received: its /__hits total (counted on arrival, retries
    included; exact with one server process), read in a thread as soon as every chunk of the job is
    done in the scratch database. No request is sent after that, and the bench stops the server
    only later (after the workers exit, the job is finished and its figures are read)."""

    def __init__(self, dsn: str, *, interval: float = 0.05) -> None:
        super().__init__(interval=interval)
        self.dsn = dsn
        self.total: int | None = None
        self.error: str | None = None

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.total is None and self.error is None:
            self.error = "the job's chunks were never seen all done while the mock server was up"

    def _run(self) -> None:
        try:
            asyncio.run(self._watch())
        except Exception as exc:  # reported with the figures, not lost with the thread
            self.error = f"watching the job failed: {exc!r}"

    async def _watch(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            url = None
            while not self._stop.is_set():
                url = url or mock_server_url()
                if url and await conn.fetchval(FETCHED_ALL):
                    await self._read(url)
                    return
                await asyncio.sleep(self.interval)
        finally:
            await conn.close()

    async def _read(self, url: str) -> None:
        # Only the total, which comes first: the body goes on to list every path (~14 MB at a
        # million), and need not be held here.
        head = b""
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{url}/__hits") as resp:
                while len(head) < 4096 and not HITS_TOTAL.match(head):
                    if not (more := await resp.content.read(4096)):
                        break
                    head += more
        except (aiohttp.ClientError, OSError) as exc:
            self.error = f"could not read {url}/__hits: {exc}"
            return
        if match := HITS_TOTAL.match(head):
            self.total = int(match.group(1))
        else:
            self.error = f"{url}/__hits does not start with a total: {head[:80]!r}"


def run_case(duplicates: float, args, db: harness.ScratchDatabase) -> dict:
    db.empty()
    with tempfile.TemporaryDirectory(prefix="crawler-duplicates-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "bench",
            "--urls",
            str(args.urls),
            "--duplicates",
            str(duplicates),
            "--workers",
            str(args.workers),
            "--concurrency",
            str(args.concurrency),
            "--server-processes",
            "1",
            "--dsn",
            db.dsn,
            "--summary-json",
            str(summary_path),
            "--quiet",
        ]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        with ServerHits(db.dsn) as hits:
            timed = harness.run_timed(FRESH_START + cmd, timeout=args.timeout, sample_exclude=("crawler.mock.server",))
        if timed.returncode != 0 or not summary_path.exists():
            raise SystemExit(
                f"duplicates: the bench with {duplicates:.0%} duplicates failed ({timed.returncode}):"
                f" {timed.stderr[-2000:]}"
            )
        summary = json.loads(summary_path.read_text())
    bench = summary["bench"]
    supervisor = bench["peak_rss_bytes"]["supervisor"]
    workers = bench["peak_rss_bytes"]["workers"]
    return {
        "duplicates": duplicates,
        "rows": summary["rows"],
        "fetched": summary["fetched"],
        "retries": summary["retries"],
        "server_received": hits.total,
        "server_received_error": hits.error,
        "from_cache": summary["from_cache"],
        "cache": summary["cache"],
        "failed": summary["failed"],
        "elapsed_s": summary["elapsed_s"],
        "wall_s": round(timed.wall_s, 2),
        "requests_per_s": summary["requests_per_s"],
        "rows_per_s": round(summary["rows"] / summary["elapsed_s"], 1),
        "fetch_rate_per_s": bench["fetch_rate_per_s"],
        "time_to_first_request_s": bench["time_to_first_request_s"],
        # From the last request to the end: workers exit, duplicates get their first row's outcome.
        "after_last_request_s": round(
            summary["elapsed_s"] - bench["time_to_first_request_s"] - summary["fetched"] / bench["fetch_rate_per_s"], 2
        ),
        "supervisor_peak_rss": supervisor,
        "worker_peak_rss": workers,
        "largest_worker_peak_rss": max(workers),
        "supervisor_and_largest_worker_peak_rss": supervisor + max(workers),
        "sampled_peak_rss_total": timed.peak_total_rss,
        "load_1m": timed.load_1m,
    }


def medians(runs: list[dict]) -> dict:
    keys = [
        "rows",
        "fetched",
        "retries",
        "server_received",
        "from_cache",
        "failed",
        "elapsed_s",
        "requests_per_s",
        "rows_per_s",
        "fetch_rate_per_s",
        "after_last_request_s",
        "supervisor_peak_rss",
        "largest_worker_peak_rss",
        "supervisor_and_largest_worker_peak_rss",
        "sampled_peak_rss_total",
    ]
    return {key: harness.median([r[key] for r in runs]) for key in keys}


def count(n: float | None) -> str:
    return "?" if n is None else f"{n:,.0f}"


def report(with_dups: dict, without: dict, runs: int, fraction: float) -> dict:
    lines = [
        ("rows", count, "rows"),
        ("unique requests (fetched, not from cache)", count, "fetched"),
        ("requests the mock server received", count, "server_received"),
        ("retries (crawler's count)", count, "retries"),
        ("cache hits (duplicate rows)", count, "from_cache"),
        ("failed rows", count, "failed"),
        ("elapsed s", lambda x: f"{x:.1f}", "elapsed_s"),
        ("requests/s (sent)", count, "requests_per_s"),
        ("rows/s", count, "rows_per_s"),
        ("requests/s while fetching (first to last request)", count, "fetch_rate_per_s"),
        ("s after the last request (duplicates resolved, job done)", lambda x: f"{x:.1f}", "after_last_request_s"),
        ("peak RSS supervisor MiB", harness.mib, "supervisor_peak_rss"),
        ("peak RSS largest worker MiB", harness.mib, "largest_worker_peak_rss"),
        ("supervisor + largest worker MiB", harness.mib, "supervisor_and_largest_worker_peak_rss"),
        ("all crawler processes, sampled MiB", harness.mib, "sampled_peak_rss_total"),
    ]
    title = f"medians of {runs} runs each" if runs > 1 else "one run each"
    print(f"\n{title}\n")
    print(f"| | {fraction:.0%} duplicates | no duplicates |")
    print("|---|---|---|")
    for name, fmt, key in lines:
        print(f"| {name} | {fmt(with_dups[key])} | {fmt(without[key])} |")

    ratios = {
        key: with_dups[key] / without[key]
        for key in ("supervisor_peak_rss", "largest_worker_peak_rss", "supervisor_and_largest_worker_peak_rss")
    }
    total = ratios["supervisor_and_largest_worker_peak_rss"]
    verdict = (
        f"within the {TARGET - 1:.0%} target"
        if total <= TARGET
        else f"{total - 1:.1%} above: outside the {TARGET - 1:.0%} target"
    )
    print(
        f"\npeak RSS with / without duplicates: supervisor {ratios['supervisor_peak_rss']:.3f}x, largest worker"
        f" {ratios['largest_worker_peak_rss']:.3f}x, supervisor + largest worker {total:.3f}x ({verdict})"
    )
    return ratios


def check(run: dict, urls: int, fraction: float) -> None:
    """Say so when the counts are not what the generated input implies."""
    expected_dups = round(urls * fraction)
    sent = run["fetched"] + run["retries"]
    if run["server_received"] is None:
        print(f"  warning: the mock server's count is unknown ({run['server_received_error']})", flush=True)
    elif run["server_received"] != sent:
        print(
            f"  warning: the mock server received {run['server_received']:,} requests, the crawler counts"
            f" {sent:,} (fetched + retries)",
            flush=True,
        )
    if run["from_cache"] != expected_dups or run["fetched"] != urls - expected_dups:
        print(
            f"  warning: expected {urls - expected_dups:,} fetched and {expected_dups:,} from cache,"
            f" got {run['fetched']:,} and {run['from_cache']:,}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=float, default=0.3, help="fraction of repeated rows (default 0.3)")
    parser.add_argument("--runs", type=int, default=1, help="pairs of runs, alternating which case goes first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one run is killed")
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on (default: the crawler's)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not 0 < args.duplicates < 1:
        parser.error("--duplicates must be a fraction above 0 and below 1 (the other case is always 0)")

    server_dsn = harness.resolve_dsn(args.dsn)
    info = harness.machine(server_dsn)
    harness.print_machine(info)
    print(
        f"settings: {args.urls:,} URLs, {args.workers} workers, concurrency {args.concurrency}, mock server"
        f" 1 process, chunk size {args.chunk_size or 'default'}",
        flush=True,
    )
    runs: dict[float, list[dict]] = {args.duplicates: [], 0.0: []}
    with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
        for i in range(args.runs):
            # Alternating which case goes first evens out what the first run of a pair pays (a cold
            # cache, a table just truncated).
            for fraction in [args.duplicates, 0.0] if i % 2 == 0 else [0.0, args.duplicates]:
                print(f"run {i + 1}: {fraction:.0%} duplicates ...", flush=True)
                run = run_case(fraction, args, db)
                runs[fraction].append(run)
                print(
                    f"  {run['elapsed_s']:.1f} s, {run['requests_per_s']:,.0f} requests/s,"
                    f" {run['fetched']:,} fetched, server received {count(run['server_received'])},"
                    f" {run['from_cache']:,} from cache; supervisor {harness.mib(run['supervisor_peak_rss'])} MiB,"
                    f" workers {', '.join(harness.mib(n) for n in run['worker_peak_rss'])} MiB;"
                    f" load average {run['load_1m']:.1f}",
                    flush=True,
                )
                check(run, args.urls, fraction)
    with_dups, without = medians(runs[args.duplicates]), medians(runs[0.0])
    ratios = report(with_dups, without, args.runs, args.duplicates)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args) | {"json": str(args.json)},
                    "runs": {"duplicates": runs[args.duplicates], "none": runs[0.0]},
                    "medians": {"duplicates": with_dups, "none": without},
                    "rss_ratios": ratios,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
