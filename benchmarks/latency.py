"""Latency-bound crawling: the mock server answers every request after a fixed delay
(`/delay/<ms>/..`), so the best possible rate is Little's law's bound,
workers × concurrency / latency. How close does the crawler get, at several concurrencies?

    python benchmarks/latency.py [--latency-ms 100] [--concurrency 50,100,200] [--workers 2]

Each run is sized to last about `--seconds` at the bound. The achieved rate is measured three
ways: end to end (the whole job), while fetching (first lease to last result) and steady (the
middle of the fetch window, start-up and tail left out); each is printed as a ratio of the bound.
Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness


def steady_rate(db: harness.ScratchDatabase, job_id: int) -> float | None:
    """Results per second committed in the middle 80 % of the fetch window."""
    row = db.query(
        "WITH w AS (SELECT j.first_fetch_at AS t0, max(r.fetched_at) AS t1 FROM jobs j"
        "  JOIN results r ON r.job_id = j.id AND NOT r.from_cache WHERE j.id = $1 GROUP BY j.first_fetch_at),"
        " m AS (SELECT t0 + (t1 - t0) * 0.1 AS a, t0 + (t1 - t0) * 0.9 AS b FROM w)"
        " SELECT count(*) AS n, extract(epoch FROM (SELECT b - a FROM m)) AS seconds FROM results r, m"
        " WHERE r.job_id = $1 AND NOT r.from_cache AND r.fetched_at > m.a AND r.fetched_at <= m.b",
        job_id,
    )[0]
    return row["n"] / float(row["seconds"]) if row["seconds"] else None


def run_one(concurrency: int, args, db: harness.ScratchDatabase) -> dict:
    bound = args.workers * concurrency / (args.latency_ms / 1000)
    urls = int(min(args.max_urls, max(2000, bound * args.seconds)))
    db.empty()
    with tempfile.TemporaryDirectory(prefix="crawler-latency-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "bench",
            "--urls",
            str(urls),
            "--latency-ms",
            str(args.latency_ms),
            "--workers",
            str(args.workers),
            "--concurrency",
            str(concurrency),
            "--server-processes",
            str(args.server_processes),
            "--dsn",
            db.dsn,
            "--summary-json",
            str(summary_path),
            "--quiet",
        ]
        timed = harness.run_timed(cmd, timeout=args.timeout)
        if timed.returncode != 0 or not summary_path.exists():
            raise SystemExit(f"latency: the bench failed ({timed.returncode}): {timed.stderr[-2000:]}")
        summary = json.loads(summary_path.read_text())
    bench = summary["bench"]
    steady = steady_rate(db, summary["job_id"])
    return {
        "concurrency": concurrency,
        "urls": urls,
        "bound_per_s": bound,
        "end_to_end_per_s": summary["requests_per_s"],
        "fetching_per_s": bench["fetch_rate_per_s"],
        "steady_per_s": round(steady, 1) if steady else None,
        "latency_ms": bench["latency_ms"],
        "ok": summary["ok"],
        "cpu_s_per_1000_requests": bench["cpu_s_per_1000_requests"],
        "time_to_first_request_s": bench["time_to_first_request_s"],
        "elapsed_s": summary["elapsed_s"],
    }


def report(rows: list[dict], args) -> None:
    print(f"\n{args.workers} workers, {args.latency_ms} ms per request; bound = workers × concurrency / latency\n")
    print(
        "| concurrency | URLs | bound /s | end to end /s (ratio) | while fetching /s (ratio) | steady /s (ratio) |"
        " p50 / p99 ms | CPU s/1k |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bound_per_s"]
        cells = [
            f"{v:,.0f} ({v / b:.0%})" if v else "?"
            for v in (r["end_to_end_per_s"], r["fetching_per_s"], r["steady_per_s"])
        ]
        lat = r["latency_ms"]
        print(
            f"| {r['concurrency']} | {r['urls']:,} | {b:,.0f} | {' | '.join(cells)} |"
            f" {lat['p50']:.0f} / {lat['p99']:.0f} | {r['cpu_s_per_1000_requests']:.3f} |"
        )
    print("\ntarget: ≥ 90 % of the bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--concurrency", default="50,100,200", help="comma-separated, per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="about how long each run lasts at the bound")
    parser.add_argument("--max-urls", type=int, default=300_000)
    parser.add_argument("--server-processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--dsn", help="a PostgreSQL server to create a scratch database on (default: the crawler's)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    server_dsn = harness.resolve_dsn(args.dsn)
    info = harness.machine(server_dsn)
    harness.print_machine(info)
    rows = []
    with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
        for c in (int(c) for c in args.concurrency.split(",")):
            print(f"running concurrency {c} ...", flush=True)
            rows.append(run_one(c, args, db))
    report(rows, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2, default=str
            )
        )


if __name__ == "__main__":
    main()
