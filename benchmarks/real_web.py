"""The real web's shape: URLs spread over many host names, plain and TLS, ours end to end
(CSV -> PostgreSQL) against the bare aiohttp + uvloop script (2 processes, aiohttp's defaults,
persisting nothing) on the same file:

    python benchmarks/real_web.py [--urls 100000] [--hosts 1,10000,100000] [--schemes http,https] [--runs 3]
    python benchmarks/real_web.py --slow-share 0.05 --slow-ms 2000 --hosts 10000 --schemes https

For each shape (hosts x scheme) a URL file is written as `crawler bench --hosts N` writes it
(the unique URLs dealt to hosts h<k>.bench.test, an even share each, in random order, as in a shuffled
list; 1 host means 127.0.0.1 itself, no name at all). Every run starts its own mock server (with
--tls: a certificate made at start, its CA given to both tools) and, with names, a DNS responder
on loopback given to both tools as their only resolver. Runs are interleaved (ours, bare; then
bare, ours ...); figures are medians, the ratio is ours / bare of the medians of this same
invocation. Per run: requests/s (URLs / wall time from process start to exit), the largest
process's peak RSS (sampled every 0.1 s; the servers excluded), the connections the server
accepted (with TLS: handshakes), and the DNS questions the responder was asked.

With --slow-share F (the slow-host case) only ours runs, on the first shape, twice per round: on
the file's fast rows alone, then on the same rows with a share F of slow rows mixed in evenly
(/delay/<slow-ms>/ on F of the hosts, slow-<k>.bench.test): the fast rows' rate with the slow
rows among them over their rate alone (wall time alone / wall time mixed) says how much the slow
hosts held the others back (the goal: at least 0.9).
Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.ROOT))
from crawler.mock.bench import DNSResponderProcess, MockServerProcess, write_urls  # noqa: E402

TOOLS = ("ours", "bare")


def command(tool: str, urls: Path, args, dsn: str, summary: Path, dns: str | None, ca_file: Path | None) -> list[str]:
    extra = (["--dns-server", dns] if dns else []) + (["--ca-file", str(ca_file)] if ca_file else [])
    if tool == "ours":
        return [
            sys.executable,
            "-m",
            "crawler",
            "crawl",
            str(urls),
            "--dsn",
            dsn,
            "--workers",
            str(args.workers),
            "--concurrency",
            str(args.concurrency),
            "--allow-net",
            "127.0.0.1/32",
            "--quiet",
            "--summary-json",
            str(summary),
            *extra,
        ]
    return [
        sys.executable,
        str(harness.BENCHMARKS / "peers" / "aiohttp_floor.py"),
        str(urls),
        "--concurrency",
        str(args.concurrency),
        "--processes",
        str(args.workers),
        *extra,
    ]


def write_rows(path: Path, base: str, args, hosts: int, slow: bool) -> None:
    """The shape's URL file; with `slow`, a share args.slow_share of slow rows mixed in evenly
    (on top of the same fast rows), on that share of the hosts."""
    write_urls(path, base, args.urls, 0.0, 0, hosts=hosts if hosts > 1 else None)
    if not slow:
        return
    scheme, _, authority = base.partition("://")
    port = authority.rsplit(":", 1)[1]
    slow_hosts = max(1, round(hosts * args.slow_share))
    fast = path.read_text().splitlines()[1:]
    every = max(1, round((1 - args.slow_share) / args.slow_share))  # fast rows between two slow ones
    mixed = []
    for i, row in enumerate(fast):
        mixed.append(row)
        if i % every == every - 1:
            k = i // every
            mixed.append(f"{scheme}://slow-{k % slow_hosts}.bench.test:{port}/delay/{args.slow_ms}/{k}")
    path.write_text("url\n" + "".join(f"{row}\n" for row in mixed))


def _spent(before: float | None, after: float | None) -> float | None:
    return round(after - before, 3) if before is not None and after is not None else None


def run_once(tool: str, hosts: int, tls: bool, args, db: harness.ScratchDatabase, slow: bool = False) -> dict:
    postgres = harness.PostgresCPU(db.dsn)
    with tempfile.TemporaryDirectory(prefix="crawler-real-web-") as tmp:
        tmp = Path(tmp)
        ca_file = tmp / "ca.pem" if tls else None
        summary = tmp / "summary.json"
        responder = DNSResponderProcess() if hosts > 1 else None
        server = MockServerProcess(args.server_processes, ca_file)
        with server:
            if responder is not None:
                responder.__enter__()
            try:
                urls = tmp / "urls.csv"
                write_rows(urls, server.url, args, hosts, slow)
                cmd = command(tool, urls, args, db.dsn, summary, responder.url if responder else None, ca_file)
                server_before, postgres_before = server.cpu_seconds(), postgres.seconds()
                timed = harness.run_timed(
                    cmd, timeout=args.timeout, sample_exclude=("crawler.mock.server", "crawler.mock.dns_responder")
                )
                server_cpu = _spent(server_before, server.cpu_seconds())
                postgres_cpu = _spent(postgres_before, postgres.seconds())
            finally:
                if responder is not None:
                    responder.__exit__()
        rows = sum(1 for _ in urls.open()) - 1 if slow else args.urls
        row = {
            "tool": tool,
            "hosts": hosts,
            "tls": tls,
            "urls": rows,
            "slow": slow,
            "returncode": timed.returncode,
            "wall_s": round(timed.wall_s, 3),
            "cpu_s": round(timed.cpu_s, 3),
            # The machine's other CPU users in the run: the same server for both tools, and
            # PostgreSQL (ours alone writes to it).
            "server_cpu_s": server_cpu,
            "postgres_cpu_s": postgres_cpu,
            "load_1m": timed.load_1m,
            "largest_rss": max((rss for _, rss in timed.peaks.values()), default=0),
            # Which process it was: the supervisor ("main") or a worker, each role's largest.
            "largest_rss_by_role": {
                role: max(rss for name, rss in timed.peaks.values() if name == role)
                for role in {name for name, _ in timed.peaks.values()}
            },
            "connections": server.connections(),
            "dns_questions": responder.reports[0]["queries"] if responder and responder.reports else None,
        }
        if tool == "ours" and summary.exists():
            row["ok"] = json.loads(summary.read_text())["ok"]
        elif tool == "bare":
            try:
                row["ok"] = json.loads(timed.stdout.strip().splitlines()[-1])["ok"]
            except (IndexError, ValueError, KeyError):
                pass
    if args.stderr_dir is not None:  # e.g. the event loop's callback errors, with their tracebacks
        args.stderr_dir.mkdir(parents=True, exist_ok=True)
        (args.stderr_dir / f"{tool}-{hosts}-{'tls' if tls else 'http'}-{args.urls}-{int(time.time())}.txt").write_text(
            timed.stderr
        )
    if timed.returncode != 0 or row.get("ok") != row["urls"]:
        row["problem"] = (timed.stderr.strip().splitlines() or ["?"])[-1][:300]
    row["requests_per_s"] = round(row["urls"] / timed.wall_s, 1)
    if tool == "ours":
        db.empty()
    return row


def report(rows: list[dict], hosts: int, tls: bool, urls: int) -> dict:
    shape = f"{hosts:,} host{'s' if hosts > 1 else ''}, {'TLS' if tls else 'HTTP'}"
    medians = {}
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool]
        medians[tool] = {
            "requests_per_s": harness.median([r["requests_per_s"] for r in mine]),
            "largest_rss": harness.median([r["largest_rss"] for r in mine]),
            "connections": harness.median([r["connections"] for r in mine if r["connections"] is not None]),
            "dns_questions": harness.median([r["dns_questions"] for r in mine if r["dns_questions"] is not None]),
            "all_ok": all(r.get("ok") == urls and r["returncode"] == 0 for r in mine),
        }
    ours, bare = medians["ours"], medians["bare"]
    if not bare["requests_per_s"]:  # --tools ours
        print(
            f"| {shape} | – | {ours['requests_per_s']:,.0f}/s | – | – | {harness.mib(ours['largest_rss'])} MiB | "
            f"– / {ours['connections'] or 0:,.0f} | – / {ours['dns_questions'] or 0:,.0f} | "
            f"{'yes' if ours['all_ok'] else 'NO'} |",
            flush=True,
        )
        return {"shape": shape, **{f"ours_{k}": v for k, v in ours.items()}}
    ratio = (
        ours["requests_per_s"] / bare["requests_per_s"] if ours["requests_per_s"] and bare["requests_per_s"] else None
    )
    print(
        f"| {shape} | {bare['requests_per_s']:,.0f}/s | {ours['requests_per_s']:,.0f}/s | "
        f"{ratio:.2f} | {harness.mib(bare['largest_rss'])} MiB | {harness.mib(ours['largest_rss'])} MiB | "
        f"{bare['connections'] or 0:,.0f} / {ours['connections'] or 0:,.0f} | "
        f"{bare['dns_questions'] or 0:,.0f} / {ours['dns_questions'] or 0:,.0f} | "
        f"{'yes' if bare['all_ok'] and ours['all_ok'] else 'NO'} |",
        flush=True,
    )
    return {"shape": shape, "ratio": ratio, **{f"{t}_{k}": v for t in TOOLS for k, v in medians[t].items()}}


def slow_case(hosts: int, tls: bool, args, db: harness.ScratchDatabase) -> dict:
    rows = []
    for run in range(args.runs):
        for slow in (False, True) if run % 2 == 0 else (True, False):
            row = run_once("ours", hosts, tls, args, db, slow=slow)
            row["run"] = run
            rows.append(row)
            problem = f"  PROBLEM: {row['problem']}" if "problem" in row else ""
            print(
                f"  run {run + 1} {'with' if slow else 'without'} slow rows: {row['urls']} rows"
                f" in {row['wall_s']:.1f} s, load {row['load_1m']:.1f}{problem}",
                flush=True,
            )
    alone = harness.median([r["wall_s"] for r in rows if not r["slow"]])
    mixed = harness.median([r["wall_s"] for r in rows if r["slow"]])
    print(
        f"\nslow-host case, {hosts:,} hosts {'TLS' if tls else 'HTTP'}: {args.urls:,} fast rows"
        f" alone in {alone:.1f} s, with {args.slow_share:.0%} slow rows ({args.slow_ms} ms) in {mixed:.1f} s:"
        f" the fast rows' rate with the slow ones among them is {alone / mixed:.2f} of their rate alone"
    )
    return {"runs": rows, "fast_rate_ratio": alone / mixed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--hosts", default="1,10000,100000", help="comma-separated host counts")
    parser.add_argument("--schemes", default="http,https")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="our workers, and the bare script's processes")
    parser.add_argument("--concurrency", type=int, default=200, help="in-flight requests per process")
    parser.add_argument("--server-processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is killed")
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on (default: the crawler's)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--stderr-dir", type=Path, help="keep each run's stderr in a file here")
    parser.add_argument(
        "--tools",
        default="ours,bare",
        help="which tools run: 'ours' alone measures the crawler's rate and memory at sizes"
        " where the bare script's idle connections would take the machine's memory",
    )
    parser.add_argument("--slow-share", type=float, default=0.0, help="the slow-host case: this share of slow rows")
    parser.add_argument("--slow-ms", type=int, default=2000, help="how long a slow host takes to answer")
    args = parser.parse_args()
    shapes = [(int(h), scheme == "https") for scheme in args.schemes.split(",") for h in args.hosts.split(",")]
    server_dsn = harness.resolve_dsn(args.dsn)
    info = harness.machine(server_dsn)
    harness.print_machine(info)
    print(f"settings: {args.urls} URLs, {args.runs} runs, {args.workers} processes x {args.concurrency}", flush=True)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "shapes": []}
    table = []
    if args.slow_share > 0:
        with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
            results["slow_case"] = slow_case(*shapes[0], args, db)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
        for hosts, tls in shapes:
            rows = []
            for run in range(args.runs):
                tools = [t for t in TOOLS if t in args.tools.split(",")]
                for tool in tools if run % 2 == 0 else tools[::-1]:
                    row = run_once(tool, hosts, tls, args, db)
                    row["run"] = run
                    rows.append(row)
                    print(
                        f"  {hosts} hosts {'TLS' if tls else 'HTTP'} run {run + 1} {tool}: "
                        f"{row['requests_per_s']:,.0f}/s, largest process {harness.mib(row['largest_rss'])} MiB,"
                        f" connections {row['connections']}, DNS questions {row['dns_questions']},"
                        f" by role { ({k: harness.mib(v) for k, v in row['largest_rss_by_role'].items()}) },"
                        f" CPU s tool {row['cpu_s']:.1f} server {row['server_cpu_s'] or 0:.1f}"
                        f" PostgreSQL {row['postgres_cpu_s'] or 0:.1f},"
                        f" load {row['load_1m']:.1f}" + (f"  PROBLEM: {row['problem']}" if "problem" in row else ""),
                        flush=True,
                    )
            table.append((rows, hosts, tls))
            results["shapes"].append({"hosts": hosts, "tls": tls, "runs": rows})
    print(
        f"\n| shape ({args.urls:,} URLs) | bare script | ours | ratio | bare: largest process | ours: largest process"
        " | connections bare / ours | DNS questions bare / ours | all ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, hosts, tls in table:
        results.setdefault("medians", []).append(report(rows, hosts, tls, args.urls))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
