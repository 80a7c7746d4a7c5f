"""`crawler bench` end to end, the working tree against a git revision, runs interleaved:

    python benchmarks/ab_bench.py [--urls 100000] [--runs 3] [--baseline HEAD] [--dsn DSN]

`base` is the crawler package (with its migrations and config) as of --baseline, exported with
`git archive` and put first on PYTHONPATH, so its supervisor, workers and mock server are that
revision's; `current` is the working tree. Both run in one scratch database, emptied before each
run. Figures per variant (medians): elapsed, requests/s, CPU seconds per 1 000 requests of the
crawler's processes (as the bench reports them), of PostgreSQL (the whole local server: other
users of it count too) and of the mock server. Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness

VARIANTS = ("base", "current")


def run(variant: str, args, db: harness.ScratchDatabase, pg: harness.PostgresCPU, tmp: str, base_tree: str) -> dict:
    db.empty()
    env = dict(os.environ)
    if variant == "base":
        env["PYTHONPATH"] = base_tree + os.pathsep + env.get("PYTHONPATH", "")
    summary_path = Path(tmp) / "summary.json"
    summary_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "crawler",
        "bench",
        "--urls",
        str(args.urls),
        "--workers",
        str(args.workers),
        "--concurrency",
        str(args.concurrency),
        "--dsn",
        db.dsn,
        "--summary-json",
        str(summary_path),
        "--quiet",
    ]
    pg_before = pg.seconds()
    timed = harness.run_timed(cmd, timeout=args.timeout, env=env, cwd=Path(tmp))  # not the checkout: no stray import
    pg_after = pg.seconds()
    if timed.returncode != 0 or not summary_path.exists():
        raise SystemExit(f"ab_bench: {variant} failed ({timed.returncode}): {timed.stderr[-2000:]}")
    summary = json.loads(summary_path.read_text())
    bench, fetched = summary["bench"], summary["fetched"]
    return {
        "elapsed_s": summary["elapsed_s"],
        "requests_per_s": summary["requests_per_s"],
        "crawler_cpu": bench["cpu_s_per_1000_requests"],
        "supervisor_cpu": 1000 * bench["cpu_s"]["supervisor"] / fetched,
        "workers_cpu": 1000 * bench["cpu_s"]["workers"] / fetched,
        "postgres_cpu": (
            1000 * (pg_after - pg_before) / fetched if pg_before is not None and pg_after is not None else None
        ),
        "server_cpu": (
            1000 * bench["mock_server_cpu_s"] / fetched if bench.get("mock_server_cpu_s") is not None else None
        ),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--dsn", help="PostgreSQL server (default: the crawler's own)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="keep every run's figures here")
    args = parser.parse_args()
    server_dsn = harness.resolve_dsn(args.dsn)
    harness.print_machine(harness.machine(server_dsn))
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="crawler-ab-") as tmp, harness.ScratchDatabase(server_dsn) as db:
        base_tree = str(Path(tmp) / "base")
        os.mkdir(base_tree)
        harness.export_revision(args.baseline, base_tree)
        pg = harness.PostgresCPU(server_dsn)
        print(
            f"baseline {args.baseline}; {args.urls} URLs, {args.workers} workers, concurrency {args.concurrency},"
            f" {args.runs} runs",
            flush=True,
        )
        for index in range(args.runs):
            for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
                r = run(variant, args, db, pg, tmp, base_tree)
                rows[variant].append(r)
                print(
                    f"  {variant}: {r['elapsed_s']:.1f} s, {r['requests_per_s']:,.0f}/s, CPU s/1 000: crawler"
                    f" {r['crawler_cpu']:.3f} (supervisor {r['supervisor_cpu']:.3f}), PostgreSQL"
                    f" {r['postgres_cpu'] or 0:.3f}, mock server {r['server_cpu'] or 0:.3f}; load {r['load']:.1f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = ("elapsed_s", "requests_per_s", "crawler_cpu", "supervisor_cpu", "workers_cpu", "postgres_cpu", "server_cpu")
    print(
        "\n| variant | elapsed s | requests/s | CPU s / 1 000: crawler | supervisor | workers | PostgreSQL |"
        " mock server | crawler + PostgreSQL |\n|---|---|---|---|---|---|---|---|---|"
    )
    for variant in VARIANTS:
        m = {k: harness.median([r[k] for r in rows[variant]]) for k in keys}
        both = harness.median([r["crawler_cpu"] + (r["postgres_cpu"] or 0) for r in rows[variant]])
        print(
            f"| {variant} | {m['elapsed_s']:.1f} | {m['requests_per_s']:,.0f} | {m['crawler_cpu']:.3f} |"
            f" {m['supervisor_cpu']:.3f} | {m['workers_cpu']:.3f} | {m['postgres_cpu'] or 0:.3f} |"
            f" {m['server_cpu'] or 0:.3f} | {both:.3f} |"
        )


if __name__ == "__main__":
    main()
