"""N URLs end to end (`crawler bench`: CSV -> PostgreSQL against the mock server), and whether the
crawler's memory stays flat as the input grows:

    python benchmarks/scale.py [--urls 1000000]
    python benchmarks/scale.py --rss-series 100000,1000000,3000000

Each size runs in a scratch database emptied before the run. Figures per size: elapsed, requests/s,
peak RSS of the supervisor and of each worker (getrusage, reported by the crawler itself), the
sampled peak of all the crawler's processes together (the mock server excluded), CPU per 1 000
requests, and PostgreSQL's CPU and database size. Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness


def run_size(urls: int, args, db: harness.ScratchDatabase, pg: harness.PostgresCPU) -> dict:
    db.empty()
    with tempfile.TemporaryDirectory(prefix="crawler-scale-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "bench",
            "--urls",
            str(urls),
            "--workers",
            str(args.workers),
            "--concurrency",
            str(args.concurrency),
            "--server-processes",
            str(args.server_processes),
            "--dsn",
            db.dsn,
            "--summary-json",
            str(summary_path),
            "--quiet",
        ]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        pg_before = pg.seconds()
        timed = harness.run_timed(cmd, timeout=args.timeout, sample_exclude=("crawler.mock.server",))
        pg_after = pg.seconds()
        if timed.returncode != 0 or not summary_path.exists():
            raise SystemExit(f"scale: the bench of {urls} URLs failed ({timed.returncode}): {timed.stderr[-2000:]}")
        summary = json.loads(summary_path.read_text())
    size = db.query("SELECT pg_database_size(current_database()) AS n")[0]["n"]
    bench = summary["bench"]
    roles: dict[str, int] = {}
    for name, rss in timed.peaks.values():
        roles[name] = max(roles.get(name, 0), rss)
    return {
        "urls": urls,
        "wall_s": round(timed.wall_s, 2),
        "elapsed_s": summary["elapsed_s"],
        "requests_per_s": summary["requests_per_s"],
        "fetch_rate_per_s": bench["fetch_rate_per_s"],
        "fetched": summary["fetched"],
        "ok": summary["ok"],
        "latency_ms": bench["latency_ms"],
        "cpu_s_per_1000_requests": bench["cpu_s_per_1000_requests"],
        "postgres_cpu_s_per_1000_requests": (
            round(1000 * (pg_after - pg_before) / summary["fetched"], 4)
            if pg_before is not None and pg_after is not None
            else None
        ),
        "mock_server_cpu_s": bench.get("mock_server_cpu_s"),
        "supervisor_peak_rss": bench["peak_rss_bytes"]["supervisor"],
        "worker_peak_rss": bench["peak_rss_bytes"]["workers"],
        "sampled_peak_rss_by_role": roles,
        "sampled_peak_rss_total": timed.peak_total_rss,
        "rows_written_per_s": bench["rows_written_per_s"],
        "time_to_first_request_s": bench["time_to_first_request_s"],
        "database_bytes": size,
    }


def report(rows: list[dict]) -> None:
    print(
        "\n| URLs | elapsed s | requests/s | while fetching /s | p50/p95/p99 ms | CPU s/1k (+PG) |"
        " supervisor RSS MiB | workers RSS MiB | all crawler processes MiB | rows/s written |"
        " first request s | database MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency_ms"]
        pg = r["postgres_cpu_s_per_1000_requests"]
        print(
            f"| {r['urls']:,} | {r['elapsed_s']:.1f} | {r['requests_per_s']:,.0f} | {r['fetch_rate_per_s']:,.0f} |"
            f" {lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f} |"
            f" {r['cpu_s_per_1000_requests']:.3f}" + (f" (+{pg:.3f})" if pg is not None else "") + " |"
            f" {harness.mib(r['supervisor_peak_rss'])} | {', '.join(harness.mib(n) for n in r['worker_peak_rss'])} |"
            f" {harness.mib(r['sampled_peak_rss_total'])} | {r['rows_written_per_s']:,.0f} |"
            f" {r['time_to_first_request_s']:.2f} | {harness.mib(r['database_bytes'])} |"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]

        def peak(r):  # exact getrusage peaks, summed over the supervisor and the workers
            return r["supervisor_peak_rss"] + sum(r["worker_peak_rss"])

        print(
            f"\nRSS at {last['urls']:,} vs {first['urls']:,} URLs: supervisor"
            f" {last['supervisor_peak_rss'] / first['supervisor_peak_rss']:.2f}x, largest worker"
            f" {max(last['worker_peak_rss']) / max(first['worker_peak_rss']):.2f}x, supervisor + workers"
            f" {peak(last) / peak(first):.2f}x (target: within 1.10x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=1_000_000)
    parser.add_argument("--rss-series", help="comma-separated sizes, e.g. 100000,1000000,3000000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--server-processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one run is killed")
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on (default: the crawler's)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--setup-sql", help="SQL run in the scratch database after its migrations (schema experiments)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.rss_series.split(",")] if args.rss_series else [args.urls]

    server_dsn = harness.resolve_dsn(args.dsn)
    info = harness.machine(server_dsn)
    harness.print_machine(info)
    print(
        f"settings: {args.workers} workers, concurrency {args.concurrency}, mock server"
        f" {args.server_processes} process(es), chunk size {args.chunk_size or 'default'}",
        flush=True,
    )
    rows = []
    with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
        pg = harness.PostgresCPU(db.dsn)
        if args.setup_sql:
            db.execute(args.setup_sql)
        for urls in sizes:
            print(f"running {urls:,} URLs ...", flush=True)
            rows.append(run_size(urls, args, db, pg))
            r = rows[-1]
            print(
                f"  {r['elapsed_s']:.1f} s, {r['requests_per_s']:,.0f}/s, supervisor"
                f" {harness.mib(r['supervisor_peak_rss'])} MiB, workers"
                f" {', '.join(harness.mib(n) for n in r['worker_peak_rss'])} MiB",
                flush=True,
            )
    report(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2, default=str
            )
        )


if __name__ == "__main__":
    main()
