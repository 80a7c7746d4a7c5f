"""What one worker process costs per request, all of it: leasing chunks, the host scheduler, the
Fetcher, retry bookkeeping, result records and the ResultWriter's COPY — the working tree against a
git revision, so that a change to crawler/fetch/worker.py, hosts.py, writer.py or fetcher.py can be
measured on a noisy machine.

    python benchmarks/worker_path.py --callgrind [--urls 1000] [--runs 3] [--baseline HEAD] [--dsn DSN]
    python benchmarks/worker_path.py [--urls 50000] [--runs 3] [--server nginx|mock]

Variants: `base` is the crawler package as of --baseline (default HEAD), exported with `git archive`
and put first on the child's PYTHONPATH; `current` is the working tree, copied when the script
starts and put first on PYTHONPATH the same way (edits made while it runs do not mix into its
figures). The database schema and the ingest are the working tree's for both: a scratch database
on the crawler's PostgreSQL (or --dsn), emptied before every child, dropped at the end.

For every child the parent ingests a fresh job of N rows pointing at nginx (or the mock server) on
127.0.0.1, one distinct URL per row (`/ok/<n>`), with the crawler's own ingest (open_input,
store_chunk in chunks of 1 000, mark_ingested) as the supervisor does; then one worker
process (`crawler.fetch.worker.Worker` on uvloop, workers=1, concurrency --concurrency, the default
per-host budget and retry policy) runs the job to its end, and the parent checks that the job has N
results. The ingest is in no figure.

With --callgrind (the point of this script) each child runs under `valgrind --tool=callgrind`,
once with --urls and once with 3 x --urls rows: the difference in instructions the worker process
executed, over the difference in requests, is its instructions per request, start-up (imports,
connections, registration) cancelled out. Other load on the machine barely moves it, unlike CPU
seconds. Work done by the clock rather than per request is kept out: the job's write_interval and
heartbeat are an hour, so batches are written when 1 000 results are buffered or a chunk
completes, as at full speed (with the default 0.5 s timer, --real-timers, the slowed child writes
smaller batches: +2.5 % per request measured, more the slower it runs). Children run with
PYTHONHASHSEED=0. Repeated runs of one variant still differ by up to ~2 %: CPython's specialising
interpreter and per-class attribute layouts follow the order in which answers arrive; take the
median of --runs 5 for differences of a few per cent. Valgrind slows the worker 30-50x, so
answers queue up more than at full speed: compare variants with each other, not with CPU figures.

Without --callgrind each child runs plainly and reports its own CPU seconds (getrusage around
`worker.run()`) per 1 000 requests and its requests/s; medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("base", "current")
CHUNK_SIZE = 1000
# Clock-driven work that would otherwise scale with the run's wall time, not with its requests.
STEADY_TIMERS = {"write_interval": 3600.0, "heartbeat_seconds": 3600.0, "lease_seconds": 3 * 3600.0}


# --- the child: one worker on one job -------------------------------------------------------------


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def child(dsn: str, job_id: int) -> None:
    """Run one worker on the job to its end, with the job's stored settings (the keys this
    revision's Settings knows), as run_worker does; print its figures as JSON."""
    import dataclasses
    import gc

    import asyncpg
    import uvloop

    import crawler
    from crawler.settings import Settings

    try:  # the package's layout since it has subpackages
        from crawler.fetch import process as worker_module
        from crawler.fetch.worker import Worker
        from crawler.ledger.jobs import find_job
    except ImportError:  # a revision before them
        import crawler.worker as worker_module  # type: ignore[no-redef]
        from crawler.worker import Worker  # type: ignore[no-redef]

        from crawler.ledger import find_job  # type: ignore[no-redef]

    async def main() -> dict:
        conn = await asyncpg.connect(dsn)
        try:
            job = await find_job(conn, job_id)
        finally:
            await conn.close()
        if hasattr(worker_module, "tune_gc"):  # as run_worker does, where this revision has it
            worker_module.tune_gc()
        known = {f.name for f in dataclasses.fields(Settings)}
        settings = Settings(**{k: v for k, v in job.settings.items() if k in known})
        gc0 = [g["collections"] for g in gc.get_stats()]
        cpu0, t0 = _cpu(), time.perf_counter()
        if hasattr(worker_module, "open_worker"):  # a revision whose Worker is given its collaborators
            async with worker_module.open_worker(dsn, job_id, settings) as worker:
                stats = await worker.run()
        else:
            stats = await Worker(dsn, job_id, settings).run()
        cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
        gc_runs = [g["collections"] - n for g, n in zip(gc.get_stats(), gc0, strict=True)]
        return {
            "cpu_s": cpu,
            "wall_s": wall,
            "fetched": stats.fetched,
            "chunks": stats.chunks,
            "retries": stats.retries,
            "lost_leases": stats.lost_leases,
            "gc_collections": gc_runs,
        }

    figures = uvloop.run(main())
    print(json.dumps(figures | {"package": str(Path(crawler.__file__).resolve().parent)}), flush=True)


# --- the parent -----------------------------------------------------------------------------------


def job_settings(args: argparse.Namespace) -> dict:
    """What the job stores (as `crawler crawl` does: the settings minus the DSN)."""
    from crawler.settings import Settings

    timers = {} if args.real_timers else STEADY_TIMERS
    settings = Settings(
        allow_net=["127.0.0.1/32"],
        concurrency=args.concurrency,
        workers=1,
        chunk_size=CHUNK_SIZE,
        home="/nonexistent",
        **timers,
    )
    return {k: v for k, v in settings.as_dict().items() if k != "dsn"}


async def _ingest(dsn: str, path: Path, settings: dict) -> int:
    """A new job of the file's rows, stored as the supervisor's _ingest does; its id."""
    from crawler.job.inputs import open_input
    from crawler.ledger.chunks import ingest_position, mark_ingested, store_chunk
    from crawler.ledger.database import LedgerConnection
    from crawler.ledger.jobs import create_job

    async with LedgerConnection(dsn, outage_limit=300.0) as db:
        job = await db.run(create_job, name=None, input=str(path), settings=settings)
        chunk_no, last_row = await db.run(ingest_position, job.id)
        with open_input(str(path), url_column=None, sort_query=False) as reader:
            for batch in reader.batches(CHUNK_SIZE):
                batch = [row for row in batch if row.row > last_row]
                if not batch:
                    continue
                await db.run(store_chunk, job.id, chunk_no, batch, dedup=True)
                chunk_no += 1
        await db.run(mark_ingested, job.id)
    return job.id


def run_child(
    variant: str,
    size: int,
    args: argparse.Namespace,
    db,
    files: dict[int, Path],
    trees: dict[str, str],
    settings: dict,
    *,
    callgrind: str | None = None,
) -> dict:
    """Empty the scratch database, ingest a fresh job of `size` rows, run one worker on it in a
    child process (under callgrind if asked); the child's figures, with `ir` under callgrind."""
    import asyncio

    db.empty()
    job_id = asyncio.run(_ingest(db.dsn, files[size], settings))
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # no metrics, as a crawl without --metrics-port
    env["PYTHONHASHSEED"] = "0"  # the same str hashes, dict and set layouts in every child
    env["PYTHONPATH"] = trees[variant] + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", db.dsn, str(job_id)]
    if callgrind:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}", *cmd]
    # cwd "/": nothing but PYTHONPATH and the installed package decides which crawler is imported.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600 if callgrind else 1800, env=env, cwd="/")
    if callgrind:
        Path(callgrind).unlink(missing_ok=True)
    where = f"worker_path: {variant} at {size} URLs{' under callgrind' if callgrind else ''}"
    if done.returncode != 0:
        raise SystemExit(f"{where} failed ({done.returncode}): {done.stderr[-3000:]}")
    try:
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"{where} printed no figures: {done.stdout[-1000:]} {done.stderr[-3000:]}") from None
    expected = trees[variant]
    if not figures["package"].startswith(expected):
        raise SystemExit(f"{where} imported {figures['package']}, not a package under {expected}")
    rows = db.query(
        "SELECT count(*) AS n, count(*) FILTER (WHERE error_kind IS NULL) AS ok FROM results WHERE job_id = $1", job_id
    )[0]
    if rows["n"] != size or figures["fetched"] != size:
        raise SystemExit(
            f"{where}: the job has {rows['n']} results (the worker fetched {figures['fetched']}),"
            f" not {size}; the child's stderr ends with:\n{done.stderr[-3000:]}"
        )
    figures["ok"] = rows["ok"]
    if rows["ok"] != size:
        print(
            f"  WARNING: {variant} at {size} URLs: only {rows['ok']} of {size} results are ok"
            f" ({figures['retries']} retries): the figures include failures",
            flush=True,
        )
    if callgrind:
        import harness  # the parent's side only: children import no harness

        figures["ir"] = harness.callgrind_instructions(done.stderr)
        if figures["ir"] is None:
            raise SystemExit(f"{where}: no instruction count in callgrind's output: {done.stderr[-3000:]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, help="rows per job (default 50 000; 1 000 with --callgrind)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the `base` variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="in this order; ratios are to the first")
    parser.add_argument("--dsn", help="PostgreSQL server (default: the crawler's own)")
    parser.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instructions per request under callgrind, from --urls and 3 x --urls rows",
    )
    parser.add_argument(
        "--real-timers",
        action="store_true",
        help="keep the default write_interval (0.5 s) and heartbeat (5 s): the callgrind"
        " figure then depends on how fast the child ran",
    )
    parser.add_argument("--json", help="keep every run's figures here")
    parser.add_argument("--child", nargs=2, metavar=("DSN", "JOB_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    urls = args.urls or (1000 if args.callgrind else 50_000)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"worker_path: unknown variants {sorted(unknown)}; there are {', '.join(VARIANTS)}")

    import harness

    server_dsn = harness.resolve_dsn(args.dsn)
    harness.print_machine(harness.machine(server_dsn))
    server = harness.http_server(args.server)
    sizes = (urls, 3 * urls) if args.callgrind else (urls,)
    settings = job_settings(args)
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    with (
        tempfile.TemporaryDirectory(prefix="crawler-worker-path-") as tmp,
        server,
        harness.ScratchDatabase(server_dsn) as db,
    ):
        trees = {v: str(Path(tmp).resolve() / v) for v in VARIANTS}
        if "base" in variants:
            os.mkdir(trees["base"])
            harness.export_revision(args.baseline, trees["base"])
        # The working tree as it is now: others' edits during the run do not mix into its figures.
        for name in ("crawler", "migrations", "config"):
            shutil.copytree(
                ROOT / name, Path(trees["current"]) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        files = {size: Path(tmp) / f"urls-{size}.csv" for size in sizes}
        for size, path in files.items():
            harness.write_urls(path, server.url, size)
        what = f"callgrind, {urls} and {3 * urls} URLs" if args.callgrind else f"{urls} URLs"
        print(
            f"server: {server.describe()}; baseline {args.baseline}; {what}, one worker, concurrency"
            f" {args.concurrency}, {args.runs} runs",
            flush=True,
        )
        for run in range(args.runs):
            for variant in variants[run % len(variants) :] + variants[: run % len(variants)]:
                if args.callgrind:
                    out = str(Path(tmp) / "callgrind.out")
                    small = run_child(variant, sizes[0], args, db, files, trees, settings, callgrind=out)
                    large = run_child(variant, sizes[1], args, db, files, trees, settings, callgrind=out)
                    per_request = (large["ir"] - small["ir"]) / (sizes[1] - sizes[0])
                    rows[variant].append({"per_request": per_request, "small": small, "large": large})
                    print(
                        f"  {variant}: {per_request:,.0f} instructions per request ({small['ir']:,} at"
                        f" {sizes[0]}, {large['ir']:,} at {sizes[1]}; {small['wall_s'] + large['wall_s']:.0f} s"
                        f" under callgrind); load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                else:
                    r = run_child(variant, urls, args, db, files, trees, settings)
                    r["cpu_k"], r["rate"] = 1000 * r["cpu_s"] / urls, urls / r["wall_s"]
                    rows[variant].append(r)
                    print(
                        f"  {variant}: {r['cpu_k']:.3f} CPU s per 1 000 requests, {r['rate']:,.0f}/s"
                        f" ({r['wall_s']:.1f} s); load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    first = None
    if args.callgrind:
        print("\n| variant | instructions per request (median) | vs first | runs |\n|---|---|---|---|")
        for variant in variants:
            ir = harness.median([r["per_request"] for r in rows[variant]])
            first = first or ir
            runs = ", ".join(f"{r['per_request'] / 1000:,.1f} k" for r in rows[variant])
            print(f"| {variant} | {ir:,.0f} | {ir / first:.3f}x | {runs} |")
        return
    print(
        "\n| variant | CPU s per 1 000 requests (median) | vs first | requests/s | runs (CPU s per 1 000) |"
        "\n|---|---|---|---|---|"
    )
    for variant in variants:
        cpu_k = harness.median([r["cpu_k"] for r in rows[variant]])
        rate = harness.median([r["rate"] for r in rows[variant]])
        first = first or cpu_k
        runs = ", ".join(f"{r['cpu_k']:.3f}" for r in rows[variant])
        print(f"| {variant} | {cpu_k:.3f} | {cpu_k / first:.2f}x | {rate:,.0f} | {runs} |")


if __name__ == "__main__":
    main()
