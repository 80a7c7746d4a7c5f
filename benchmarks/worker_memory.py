"""What one worker process holds in memory as it works through many hosts, sampled over time:
whether its memory follows the work in flight or grows with the rows (or hosts) it has done.

    python benchmarks/worker_memory.py [--urls 90000] [--hosts 30000] [--tls] [--every 5]
    python benchmarks/worker_memory.py --tracemalloc 10 ...   # where the growth was allocated
    MALLOC_ARENA_MAX=2 python benchmarks/worker_memory.py ...   # glibc's arenas, for the worker

The parent starts the mock server (with --tls, a certificate made at start) and the bench's DNS
responder on loopback, writes the URLs as `crawler bench --hosts N` does (an even share per host,
in random order), ingests them as the supervisor does, and runs one worker
(`crawler.fetch.worker.Worker` on uvloop, as a worker process runs it) in a child process. Every
--every seconds the child records: rows fetched, its RSS, glibc's heap (mallinfo2: bytes in use
and free inside malloc's arenas, mmapped), its threads, the per-host structures (the scheduler's
hosts, the connector's pools, the resolver's cache) and the live Python objects; at the end, the
object types that grew most since the first quarter of the run, and with --tracemalloc N the
allocation sites that grew most (N frames; slows the worker several times).

A growth that follows rows while the structures stay flat, with `free` in malloc growing as
`in use` does not, is fragmentation; `in use` or the objects growing is something kept.
Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK_SIZE = 1000


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sizes(obj: object, names: tuple[str, ...]) -> dict:
    out = {}
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            try:
                out[name] = len(value)
            except TypeError:
                pass
    return out


# --- the child: one worker on one job -------------------------------------------------------------


def child(dsn: str, job_id: int, every: float, frames: int, trim: bool, out: str) -> None:
    import dataclasses
    import gc
    from collections import Counter

    import asyncpg
    import uvloop

    import crawler.fetch.fetcher as fetcher_module
    from crawler.fetch.process import open_worker, tune_gc
    from crawler.fetch.worker import Worker
    from crawler.ledger.jobs import find_job
    from crawler.settings import Settings

    libc = _libc()
    if frames:
        import tracemalloc

        tracemalloc.start(frames)
    fetchers: list = []
    enter = fetcher_module.Fetcher.__aenter__

    async def capturing_enter(self):  # the worker's Fetcher, to read its connector and resolver
        fetchers.append(self)
        return await enter(self)

    fetcher_module.Fetcher.__aenter__ = capturing_enter
    samples: list[dict] = []
    types: list[Counter] = []
    snapshots: list = []

    def sample(worker: Worker, t0: float) -> dict:
        info = libc.mallinfo2()
        row = {
            "t": round(time.perf_counter() - t0, 1),
            "fetched": worker.stats.fetched,
            "rss": _rss(),
            "malloc_in_use": info.uordblks,
            "malloc_free": info.fordblks,
            "malloc_mmapped": info.hblkhd,
            "malloc_arena": info.arena,
            "threads": len(os.listdir("/proc/self/task")),
            "objects": len(gc.get_objects()),
            "hosts": len(worker.hosts.hosts),
            "worker": _sizes(worker, ("_held", "_lost", "_fetchers", "_timers")),
        }
        if fetchers and fetchers[0].connector is not None:
            f = fetchers[0]
            row["connector"] = _sizes(
                f.connector, ("_conns", "_acquired", "_acquired_per_host", "_waiters", "_cleanup_closed_transports")
            )
            row["connector"]["closed_idle"] = f.connector.closed_idle
            row["flights"] = len(f._flights)
            row["heap_trims"] = {"trims": f.heap.trims, "seconds": round(f.heap.seconds, 4)}
            if f.resolver is not None:
                row["resolver"] = {
                    "cache": len(f.resolver.cache),
                    "asking": len(f.resolver._asking),
                    "channels_open": len(f.resolver._in_flight),
                    "channels": f.resolver.channels,
                    "lookups": f.resolver.lookups,
                }
        writer = getattr(worker, "writer", None)
        if writer is not None:
            row["writer"] = {k: len(v) for k, v in vars(writer).items() if isinstance(v, (list, dict, set))}
        if trim:
            libc.malloc_trim(0)
            row["rss_after_trim"] = _rss()
        return row

    async def watch(worker: Worker, t0: float) -> None:
        n = 0
        while True:
            await asyncio.sleep(every)
            samples.append(sample(worker, t0))
            n += 1
            if n % 6 == 1:
                types.append(Counter(type(o).__name__ for o in gc.get_objects()))
                if frames:
                    snapshots.append(tracemalloc.take_snapshot())
            s = samples[-1]
            print(
                f"t={s['t']:>6} fetched={s['fetched']:>7} rss={s['rss'] >> 20} MiB malloc in use"
                f" {s['malloc_in_use'] >> 20} free {s['malloc_free'] >> 20} mmapped {s['malloc_mmapped'] >> 20}"
                f" threads={s['threads']} objects={s['objects']} hosts={s['hosts']}"
                f" conns={s.get('connector')} resolver={s.get('resolver')} trims={s.get('heap_trims')}",
                file=sys.stderr,
                flush=True,
            )

    async def main() -> dict:
        conn = await asyncpg.connect(dsn)
        try:
            job = await find_job(conn, job_id)
        finally:
            await conn.close()
        tune_gc()
        known = {f.name for f in dataclasses.fields(Settings)}
        settings = Settings(**{k: v for k, v in job.settings.items() if k in known})
        async with open_worker(dsn, job_id, settings) as worker:
            t0 = time.perf_counter()
            watcher = asyncio.create_task(watch(worker, t0))
            try:
                stats = await worker.run()
            finally:
                watcher.cancel()
        return {"fetched": stats.fetched, "wall_s": time.perf_counter() - t0}

    figures = uvloop.run(main())
    grew = []
    if len(types) >= 3:
        first, last = types[len(types) // 4], types[-1]
        grew = sorted(((name, last[name] - first.get(name, 0), last[name]) for name in last), key=lambda x: -x[1])[:25]
    sites = []
    if len(snapshots) >= 3:
        diff = snapshots[-1].compare_to(snapshots[len(snapshots) // 4], "traceback")
        for stat in diff[:25]:
            sites.append(
                {
                    "size_diff": stat.size_diff,
                    "count_diff": stat.count_diff,
                    "size": stat.size,
                    "where": [f"{f.filename}:{f.lineno}" for f in stat.traceback][:frames],
                }
            )
    Path(out).write_text(
        json.dumps({"figures": figures, "samples": samples, "types_grown": grew, "sites_grown": sites}, indent=1)
    )


# --- the parent -----------------------------------------------------------------------------------


async def _ingest(dsn: str, path: Path, settings: dict) -> int:
    from crawler.job.inputs import open_input
    from crawler.ledger.chunks import mark_ingested, store_chunk
    from crawler.ledger.database import LedgerConnection
    from crawler.ledger.jobs import create_job

    async with LedgerConnection(dsn, outage_limit=300.0) as db:
        job = await db.run(create_job, name=None, input=str(path), settings=settings)
        chunk_no = 0
        with open_input(str(path), url_column=None, sort_query=False) as reader:
            for batch in reader.batches(CHUNK_SIZE):
                await db.run(store_chunk, job.id, chunk_no, batch, dedup=True)
                chunk_no += 1
        await db.run(mark_ingested, job.id)
    return job.id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=90_000)
    parser.add_argument("--hosts", type=int, default=30_000)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after every sample (an experiment)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the job (JSON value), e.g. idle_hosts=0 or dns_cache_size=50000",
    )
    parser.add_argument("--server-processes", type=int, default=1)
    parser.add_argument("--dsn")
    parser.add_argument("--json", help="keep the samples here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.every, args.tracemalloc, args.trim, args.out)
        return

    import harness

    sys.path.insert(0, str(ROOT))
    from crawler.mock.bench import DNSResponderProcess, MockServerProcess, write_urls
    from crawler.settings import Settings

    server_dsn = harness.resolve_dsn(args.dsn)
    with tempfile.TemporaryDirectory(prefix="crawler-worker-memory-") as tmp:
        tmp = Path(tmp)
        ca_file = tmp / "ca.pem" if args.tls else None
        with (
            MockServerProcess(args.server_processes, ca_file) as server,
            DNSResponderProcess() as responder,
            harness.ScratchDatabase(server_dsn) as db,
        ):
            urls = tmp / "urls.csv"
            write_urls(urls, server.url, args.urls, 0.0, 0, hosts=args.hosts)
            settings = Settings(
                allow_net=["127.0.0.1/32"],
                concurrency=args.concurrency,
                workers=1,
                chunk_size=CHUNK_SIZE,
                home="/nonexistent",
                dns_servers=[responder.url],
                ca_file=str(ca_file) if ca_file else "",
            )
            for item in args.set:
                key, _, value = item.partition("=")
                setattr(settings, key, json.loads(value))
            job_id = asyncio.run(_ingest(db.dsn, urls, {k: v for k, v in settings.as_dict().items() if k != "dsn"}))
            out = tmp / "samples.json"
            env = dict(os.environ)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                db.dsn,
                str(job_id),
                "--every",
                str(args.every),
                "--tracemalloc",
                str(args.tracemalloc),
                "--out",
                str(out),
            ]
            if args.trim:
                cmd.append("--trim")
            started = time.perf_counter()
            done = subprocess.run(cmd, env=env, cwd="/", timeout=7200)
            if done.returncode != 0:
                raise SystemExit(f"worker_memory: the worker failed ({done.returncode})")
            result = json.loads(out.read_text())
            result["args"] = vars(args)
            result["wall_s"] = time.perf_counter() - started
            result["connections"] = None
        result["connections"] = server.connections()
        result["dns_questions"] = responder.reports[0]["queries"] if responder.reports else None
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    samples = result["samples"]
    print(
        f"\n{args.urls} URLs over {args.hosts} {'TLS ' if args.tls else ''}hosts, one worker:"
        f" {result['figures']['fetched']} fetched in {result['figures']['wall_s']:.0f} s;"
        f" connections {result['connections']}, DNS questions {result['dns_questions']}"
    )
    print("| fetched | RSS MiB | malloc in use | malloc free | mmapped | objects | hosts | threads |")
    print("|---|---|---|---|---|---|---|---|")
    step = max(1, len(samples) // 12)
    for s in samples[::step] + samples[-1:]:
        print(
            f"| {s['fetched']} | {s['rss'] >> 20} | {s['malloc_in_use'] >> 20} | {s['malloc_free'] >> 20} |"
            f" {s['malloc_mmapped'] >> 20} | {s['objects']} | {s['hosts']} | {s['threads']} |"
        )
    print("types grown:", result["types_grown"][:15])
    for site in result["sites_grown"][:15]:
        print(f"  {site['size_diff'] / 1024:+.0f} KiB ({site['count_diff']:+}) {site['where']}")


if __name__ == "__main__":
    main()
