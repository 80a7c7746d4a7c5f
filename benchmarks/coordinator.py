"""PostgreSQL as coordinator and sink, without HTTP: what one server sustains through the ledger's
own functions, and what every row leaves behind.

    python benchmarks/coordinator.py [--rows 1000000] [--seconds 6] [--big-chunks 1000000] [--quick]

1. ingest: `store_chunk` (COPY, dedup by fingerprint), one connection, as the supervisor does;
2. sink: per chunk `lease_chunk` + `chunk_requests` + `write_results` of its 1 000 results with
   the chunk's completion (fence checked in the same transaction), 1 writer then 4;
3. growth: bytes per request row and per result row (heap, indexes, WAL), extrapolated;
4. lease traffic: `lease_chunk` + completion (`write_results` with no rows) with 1, 4 and 16
   lessees on one job of pending chunks, and the request rate that coordinates at chunk sizes
   100, 1 000 and 10 000; then 1 and 16 lessees on a job newer than the table's statistics.
   Every chunk must end with fence 1 (leased once);
5. a job of --big-chunks chunks (1 000 000 = 1 B requests at chunk 1 000): the chunk row's size,
   leasing before and after ANALYZE, `job_counts` (what progress polls), and leasing with the
   done chunks not yet vacuumed, then after VACUUM (statistics from before the chunks were done).

Without --dsn it starts a PostgreSQL of its own (the embedded server, under a temporary home) and
removes it at the end, so that the WAL and server CPU it reports are its own; with --dsn it works
in a scratch database on that server, and WAL and CPU include whatever else the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

import harness
from crawler.job.inputs import RequestRow
from crawler.ledger import database
from crawler.ledger.chunks import chunk_requests, lease_chunk, mark_ingested, store_chunk
from crawler.ledger.jobs import create_job, job_counts
from crawler.ledger.results import ResultRow, prepare_writer, write_results
from crawler.urls import fingerprint

CHUNK = 1000  # rows per chunk in the ingest and sink phases: the crawler's default chunk_size
LEASE = 60.0  # lease_seconds, the default
TABLES = ("requests", "fingerprints", "chunks", "results")


class OwnServer:
    """The embedded PostgreSQL under a temporary home: started here, stopped and removed after."""

    def __enter__(self) -> str:
        self.home = tempfile.mkdtemp(prefix="crawler-coordinator-")
        return database.resolve_dsn(None, self.home, environ={})

    def __exit__(self, *exc: object) -> None:
        database.stop_embedded(self.home)
        shutil.rmtree(self.home, ignore_errors=True)


class Probe:
    """Wall time, this process's CPU, the server's CPU and the WAL written, over one phase."""

    def __init__(self, conn: asyncpg.Connection, pg: harness.PostgresCPU) -> None:
        self.conn, self.pg = conn, pg

    async def __aenter__(self) -> Probe:
        self.lsn = await self.conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        self.server0, self.client0, self.wall0 = self.pg.seconds(), time.process_time(), time.perf_counter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.client = time.process_time() - self.client0
        server1 = self.pg.seconds()
        self.server = None if server1 is None or self.server0 is None else server1 - self.server0
        self.wal = int(
            await self.conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", self.lsn)
        )

    def figures(self, n: int) -> dict:
        per_k = lambda s: None if s is None else round(s / n * 1000, 4)  # noqa: E731
        return {
            "n": n,
            "wall_s": round(self.wall, 2),
            "per_s": round(n / self.wall, 1),
            "client_cpu_s_per_1000": per_k(self.client),
            "server_cpu_s_per_1000": per_k(self.server),
            "wal_bytes_per_item": round(self.wal / n, 1),
        }


def url_for(n: int) -> str:
    # ~66 characters: bytes per row below scale with the URLs' length.
    return f"https://www.shop{n % 20011}.example/products/{n:09d}?ref=list&page={n % 97}"


def request_rows(first: int, count: int) -> list[RequestRow]:
    return [RequestRow(n, "GET", url_for(n), fingerprint("GET", url_for(n))) for n in range(first, first + count)]


def result_record(job_id: int, row: asyncpg.Record) -> ResultRow:
    """What a worker writes (RESULT_COLUMNS): 1 in 20 a timeout after 3 attempts, the rest 200 OK."""
    n = row["row_no"]
    if n % 20 == 0:
        return ResultRow(
            job_id,
            n,
            None,
            None,
            "timeout",
            "no answer within 60s (total timeout)",
            3,
            False,
            60000.0,
            None,
            None,
            None,
        )
    return ResultRow(
        job_id,
        n,
        200,
        row["url"],
        None,
        None,
        1,
        False,
        12.5 + n % 50,
        5120 + n % 4096,
        hashlib.sha256(row["url"].encode()).digest(),
        None,
    )


async def sizes(conn: asyncpg.Connection) -> dict:
    rows = await conn.fetch(
        "SELECT t, pg_relation_size(t::regclass) AS heap, pg_indexes_size(t::regclass) AS indexes,"
        " pg_total_relation_size(t::regclass) AS total FROM unnest($1::text[]) AS t",
        list(TABLES),
    )
    return {r["t"]: {"heap": r["heap"], "indexes": r["indexes"], "total": r["total"]} for r in rows}


# --- phases ---------------------------------------------------------------------------------------


async def commit_baseline(dsn: str, seconds: float) -> float:
    """Autocommitted one-row UPDATEs per second on one connection: the disk's flush rate, mostly."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tick_probe (id int PRIMARY KEY, n bigint);"
            " INSERT INTO tick_probe VALUES (1, 0) ON CONFLICT DO NOTHING"
        )
        n, deadline = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            await conn.execute("UPDATE tick_probe SET n = n + 1 WHERE id = 1")
            n += 1
        return n / (time.perf_counter() - started)
    finally:
        await conn.close()


async def ingest(conn: asyncpg.Connection, pg, rows: int) -> tuple[int, dict]:
    job = await create_job(conn, name="coordinator-ingest", input="generated", settings={})
    marks = []  # (rows stored, seconds): the rate along the way, which should not fall as the job grows
    async with Probe(conn, pg) as probe:
        for chunk_no, first in enumerate(range(1, rows + 1, CHUNK)):
            await store_chunk(conn, job.id, chunk_no, request_rows(first, min(CHUNK, rows + 1 - first)))
            marks.append((min(first + CHUNK - 1, rows), time.perf_counter()))
        await mark_ingested(conn, job.id)
    quarters, last = [], (0, probe.wall0)
    for q in range(1, 5):
        mark = next(m for m in marks if m[0] >= rows * q // 4)
        quarters.append(round((mark[0] - last[0]) / (mark[1] - last[1])))
        last = mark
    return job.id, probe.figures(rows) | {"per_s_by_quarter": quarters}


async def sink(dsn: str, conn: asyncpg.Connection, pg, job_id: int, writers: int, chunks: int) -> dict:
    """`writers` connections take `chunks` chunks between them, each the way a worker does."""
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    left, written, batch_s = [chunks], [0], []

    async def one(c: asyncpg.Connection, owner: str) -> None:
        await prepare_writer(c)
        while left[0] > 0:
            left[0] -= 1
            chunk = await lease_chunk(c, job_id, owner, LEASE)
            if chunk is None:
                return
            records = [result_record(job_id, r) for r in await chunk_requests(c, job_id, chunk)]
            t = time.perf_counter()
            refused = await write_results(c, job_id, {chunk.lease: records}, {chunk.lease}, LEASE)
            batch_s.append(time.perf_counter() - t)
            if refused:
                raise SystemExit(f"coordinator: chunk {chunk.lease.chunk_no} refused with nobody else leasing")
            written[0] += len(records)

    try:
        async with Probe(conn, pg) as probe:
            await asyncio.gather(*(one(c, f"sink:{i}") for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    return probe.figures(written[0]) | {
        "writers": writers,
        "write_results_ms_p50": round(statistics.median(batch_s) * 1000, 1),
    }


async def add_chunks(conn: asyncpg.Connection, name: str, count: int) -> int:
    """A job of `count` pending 1 000-row chunks, ingest done, without their requests (leasing
    never reads them)."""
    job = await create_job(conn, name=name, input="generated", settings={})
    await conn.execute(
        "INSERT INTO chunks (job_id, chunk_no, first_row, last_row, fetch_rows, input_rows)"
        " SELECT $1, g, g::bigint * 1000 + 1, g::bigint * 1000 + 1000, 1000, 1000 FROM generate_series(0, $2 - 1) g",
        job.id,
        count,
    )
    await mark_ingested(conn, job.id)
    return job.id


async def lease_traffic(
    dsn: str, conn: asyncpg.Connection, pg, lessees: int, seconds: float, pool: int, *, analyzed: bool
) -> dict:
    """Lease + complete cycles for `seconds`. `analyzed`: the table's statistics know the job (as
    after autovacuum's ANALYZE); else the job is newer than them, and the planner takes it for one
    row."""
    job_id = await add_chunks(conn, f"coordinator-lease-{lessees}-{analyzed}", pool)
    if analyzed:
        await conn.execute("ANALYZE chunks")
    conns = [await asyncpg.connect(dsn) for _ in range(lessees)]
    ends: list[float] = []
    cycle_s: list[float] = []
    ran_out = [False]

    async def one(c: asyncpg.Connection, owner: str, deadline: float) -> None:
        await prepare_writer(c)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            chunk = await lease_chunk(c, job_id, owner, LEASE)
            if chunk is None:
                ran_out[0] = True
                return
            await write_results(c, job_id, {}, {chunk.lease}, LEASE)
            ends.append(time.perf_counter())
            cycle_s.append(ends[-1] - t)

    try:
        async with Probe(conn, pg) as probe:
            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(one(c, f"lessee:{i}", deadline) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    check = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'done') AS done, max(fence) AS max_fence,"
        " count(*) FILTER (WHERE state = 'leased') AS leased FROM chunks WHERE job_id = $1",
        job_id,
    )
    if check["done"] != len(ends) or check["max_fence"] > 1 or check["leased"]:
        raise SystemExit(
            f"coordinator: the ledger leased a chunk twice or lost one: {dict(check)}, {len(ends)} cycles completed"
        )
    start = probe.wall0
    thirds = [
        sum(1 for e in ends if start + seconds * i / 3 <= e < start + seconds * (i + 1) / 3) / (seconds / 3)
        for i in range(3)
    ]
    return probe.figures(len(ends)) | {
        "lessees": lessees,
        "analyzed": analyzed,
        "open_chunks": pool,
        "cycle_ms_p50": round(statistics.median(cycle_s) * 1000, 2),
        "cycle_ms_p99": round(statistics.quantiles(cycle_s, n=100)[98] * 1000, 2) if len(cycle_s) > 100 else None,
        "per_s_by_third": [round(x) for x in thirds],
        "ran_out": ran_out[0],
    }


async def timed(n: int, fn, *args) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn(*args)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def big_job(conn: asyncpg.Connection, chunks: int, open_left: int) -> dict:
    """A job of `chunks` chunks: its chunk rows' size; leasing while the job is newer than the
    table's statistics, then with them; job_counts on it; and leasing once all but `open_left`
    chunks are done and not yet vacuumed, then after VACUUM."""
    await prepare_writer(conn)
    before = (await sizes(conn))["chunks"]["total"]
    t = time.perf_counter()
    job_id = await add_chunks(conn, "coordinator-big", chunks)
    insert_s = time.perf_counter() - t
    chunk_bytes = ((await sizes(conn))["chunks"]["total"] - before) / chunks

    async def cycle() -> None:
        chunk = await lease_chunk(conn, job_id, "big", LEASE)
        await write_results(conn, job_id, {}, {chunk.lease}, LEASE)

    unknown = await timed(3, cycle)
    await conn.execute("ANALYZE chunks")
    known = await timed(50, cycle)
    counts_ms = statistics.median(await timed(5, job_counts, conn, job_id))
    t = time.perf_counter()
    await conn.execute(
        "UPDATE chunks SET state = 'done', done_rows = fetch_rows, ok_rows = fetch_rows"
        " WHERE job_id = $1 AND chunk_no < $2 AND state = 'pending'",
        job_id,
        chunks - open_left,
    )
    done_s = time.perf_counter() - t
    take = min(200, open_left // 2)
    unvacuumed = await timed(take, cycle)
    t = time.perf_counter()
    await conn.execute("VACUUM chunks")
    vacuum_s = time.perf_counter() - t
    vacuumed = await timed(take, cycle)
    return {
        "chunks": chunks,
        "insert_s": round(insert_s, 2),
        "bytes_per_chunk_row": round(chunk_bytes, 1),
        "cycle_ms_p50_job_unknown_to_statistics": round(statistics.median(unknown), 1),
        "cycle_ms_p50_analyzed": round(statistics.median(known), 2),
        "job_counts_ms": round(counts_ms, 1),
        "mark_done_s": round(done_s, 2),
        "vacuum_s": round(vacuum_s, 2),
        "first_cycle_unvacuumed_ms": round(unvacuumed[0], 1),
        "cycle_ms_p50_unvacuumed": round(statistics.median(unvacuumed[1:]), 2),
        "cycle_ms_p50_vacuumed": round(statistics.median(vacuumed), 2),
        "job_counts_ms_after": round(statistics.median(await timed(5, job_counts, conn, job_id)), 1),
    }


async def run_all(dsn: str, pg: harness.PostgresCPU, args) -> dict:
    out: dict = {}
    conn = await asyncpg.connect(dsn)
    try:
        out["server"] = {
            r["name"]: r["setting"]
            for r in await conn.fetch(
                "SELECT name, current_setting(name) AS setting FROM pg_settings WHERE name IN"
                " ('fsync', 'synchronous_commit', 'shared_buffers', 'max_connections', 'max_wal_size', 'wal_level')"
            )
        }
        print("server settings:", ", ".join(f"{k}={v}" for k, v in sorted(out["server"].items())), flush=True)
        out["commits_per_s_one_connection"] = round(await commit_baseline(dsn, min(3.0, args.seconds)))
        print(f"bare commits, one connection: {out['commits_per_s_one_connection']}/s", flush=True)

        print(f"ingest: {args.rows:,} request rows with store_chunk ...", flush=True)
        if args.ingest_sql:
            await conn.execute(args.ingest_sql)
        job_id, out["ingest"] = await ingest(conn, pg, args.rows)
        if args.ingest_sql:
            await conn.execute("RESET ALL")
        out["sizes_after_ingest"] = await sizes(conn)
        chunks = -(-args.rows // CHUNK)
        out["sink"] = []
        for writers, share in ((1, chunks // 2), (4, chunks - chunks // 2)):
            print(f"sink: {share} chunks of results, {writers} writer(s) ...", flush=True)
            out["sink"].append(await sink(dsn, conn, pg, job_id, writers, share))
        out["sizes_after_results"] = await sizes(conn)

        out["lease"] = []
        for lessees, analyzed in ((1, True), (4, True), (16, True), (1, False), (16, False)):
            print(
                f"lease traffic: {lessees} lessee(s), {args.seconds:g}s"
                f"{'' if analyzed else ', job unknown to the statistics'} ...",
                flush=True,
            )
            out["lease"].append(
                await lease_traffic(dsn, conn, pg, lessees, args.seconds, args.lease_pool, analyzed=analyzed)
            )

        print(f"big job: {args.big_chunks:,} chunks ...", flush=True)
        out["big_job"] = await big_job(conn, args.big_chunks, min(2000, args.big_chunks // 4))
    finally:
        await conn.close()
    return out


# --- the report -----------------------------------------------------------------------------------


def growth(out: dict, rows: int) -> dict:
    a, b = out["sizes_after_ingest"], out["sizes_after_results"]
    per = lambda t, part, s=b: s[t][part] / rows  # noqa: E731
    request_side = {
        part: sum(per(t, part, a) for t in ("requests", "fingerprints", "chunks"))
        for part in ("heap", "indexes", "total")
    }
    result_side = {part: per("results", part) for part in ("heap", "indexes", "total")}
    return {
        "request_row": request_side,
        "result_row": result_side,
        "detail": {
            t: {p: round(per(t, p, a if t != "results" else b), 1) for p in ("heap", "indexes", "total")}
            for t in TABLES
        },
    }


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.2f} TiB"


def report(out: dict, args) -> None:
    rows = args.rows
    ing = out["ingest"]
    print(f"\n## Ingest ({rows:,} rows, store_chunk, one connection, {CHUNK}-row chunks, no duplicates)\n")
    quarters = ", ".join(f"{q:,}" for q in ing["per_s_by_quarter"])
    print(
        f"{ing['per_s']:,.0f} rows/s (by quarter of the rows: {quarters});"
        f" CPU s per 1 000 rows: client {ing['client_cpu_s_per_1000']},"
        f" PostgreSQL {ing['server_cpu_s_per_1000']}; WAL {ing['wal_bytes_per_item']:,.0f} bytes per row"
    )

    print("\n## Sink: per chunk lease + chunk_requests + write_results (1 000 rows, fenced, completing)\n")
    print(
        "| writers | rows/s | write_results p50 ms per 1 000 | CPU s / 1 000 rows: client | PostgreSQL"
        " | WAL bytes/row |"
    )
    print("|---|---|---|---|---|---|")
    for s in out["sink"]:
        print(
            f"| {s['writers']} | {s['per_s']:,.0f} | {s['write_results_ms_p50']} | {s['client_cpu_s_per_1000']}"
            f" | {s['server_cpu_s_per_1000']} | {s['wal_bytes_per_item']:,.0f} |"
        )

    g = out["growth"] = growth(out, rows)
    print(f"\n## Growth (bytes per row after {rows:,} rows; URLs ~{len(url_for(rows // 2))} characters)\n")
    print("| table | heap | indexes | total |")
    print("|---|---|---|---|")
    for t, d in g["detail"].items():
        print(f"| {t} | {d['heap']:.0f} | {d['indexes']:.0f} | {d['total']:.0f} |")
    wal_req, wal_res = ing["wal_bytes_per_item"], statistics.mean(s["wal_bytes_per_item"] for s in out["sink"])
    print("\n| per request (one row in, one result out) | 1 M | 100 M | 1 B |")
    print("|---|---|---|---|")
    for label, per in (
        ("request side: requests + fingerprints + chunks", g["request_row"]["total"]),
        ("result side: results", g["result_row"]["total"]),
        ("both, on disk", g["request_row"]["total"] + g["result_row"]["total"]),
        ("WAL written (ingest + results)", wal_req + wal_res),
    ):
        print(f"| {label} ({per:,.0f} B) | " + " | ".join(gib(per * n) for n in (1e6, 1e8, 1e9)) + " |")

    print(
        f"\n## Lease traffic (lease_chunk + completion, {args.seconds:g}s each, {args.lease_pool:,} open chunks;"
        f" bare commits on one connection: {out['commits_per_s_one_connection']}/s)\n"
    )
    print(
        "| lessees | statistics | cycles/s | by third of the run | cycle p50 / p99 ms | CPU ms per cycle: client |"
        " PostgreSQL | requests/s coordinated at chunk 100 / 1 000 / 10 000 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in out["lease"]:
        ceil = " / ".join(f"{r['per_s'] * size:,.0f}" for size in (100, 1000, 10000))
        print(
            f"| {r['lessees']} | {'know the job' if r['analyzed'] else 'older than the job'} | {r['per_s']:,.0f} |"
            f" {', '.join(map(str, r['per_s_by_third']))} | {r['cycle_ms_p50']} / {r['cycle_ms_p99']} |"
            f" {r['client_cpu_s_per_1000']} | {r['server_cpu_s_per_1000']} | {ceil} |"
            + (" ran out of chunks" if r["ran_out"] else "")
        )
    print("\nEvery chunk ended with fence 1 and state done: none leased twice, none lost.")

    b = out["big_job"]
    print(f"\n## A job of {b['chunks']:,} chunks (one lessee)\n")
    print(f"- chunk row: {b['bytes_per_chunk_row']:.0f} bytes with its indexes (inserted in {b['insert_s']}s)")
    print(
        f"- lease + complete while the job is newer than the statistics:"
        f" {b['cycle_ms_p50_job_unknown_to_statistics']} ms; after ANALYZE: {b['cycle_ms_p50_analyzed']} ms"
    )
    print(
        f"- job_counts (what progress polls every 0.25 s): {b['job_counts_ms']} ms;"
        f" {b['job_counts_ms_after']} ms when nearly done"
    )
    print(
        f"- all but the last chunks marked done in {b['mark_done_s']}s; lease + complete before VACUUM: first"
        f" {b['first_cycle_unvacuumed_ms']} ms, then p50 {b['cycle_ms_p50_unvacuumed']} ms;"
        f" VACUUM {b['vacuum_s']}s; after, with statistics from before: p50 {b['cycle_ms_p50_vacuumed']} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="request rows ingested, then given results")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each lease-traffic run")
    parser.add_argument("--lease-pool", type=int, default=60_000, help="pending chunks per lease-traffic run")
    parser.add_argument("--big-chunks", type=int, default=1_000_000)
    parser.add_argument(
        "--ingest-sql", help="run on the ingest connection first, e.g. 'SET enable_hashjoin = off' (plan experiments)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 000 rows, 1.5 s runs, 20 000 chunks")
    parser.add_argument(
        "--dsn",
        help="a PostgreSQL server to create a scratch database on"
        " (default: a private embedded server, removed at the end)",
    )
    parser.add_argument("--keep-db", action="store_true", help="with --dsn: keep the scratch database")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds, args.lease_pool, args.big_chunks = 20_000, 1.5, 20_000, 20_000

    import uvloop

    with OwnServer() if args.dsn is None else contextlib.nullcontext(args.dsn) as server_dsn:
        info = harness.machine(server_dsn)
        harness.print_machine(info)
        print("server: " + ("a private embedded PostgreSQL" if args.dsn is None else database.mask_dsn(server_dsn)))
        with harness.ScratchDatabase(server_dsn, keep=args.keep_db) as db:
            pg = harness.PostgresCPU(db.dsn)
            started = time.perf_counter()
            out = uvloop.run(run_all(db.dsn, pg, args))
            report(out, args)
            print(f"\n{time.perf_counter() - started:.0f}s in all; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)}, **out}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
