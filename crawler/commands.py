"""The small commands (db, migrate, export, status, jobs, worker, config): each opens what it
needs, does one thing and returns an exit code. The crawl itself lives in crawl.py."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import orjson
from rich.console import Console
from rich.table import Table

from crawler.errors import EXIT_OK
from crawler.export import export_file, export_job
from crawler.fetch.storable import printable
from crawler.job.crawl import prepare_database
from crawler.ledger import database, registry
from crawler.ledger.jobs import Job, find_job, job_counts, job_list, latest_job_id
from crawler.ledger.migrate import apply_migrations
from crawler.ledger.summary import job_summary
from crawler.settings import Settings, for_job
from crawler.states import JobState

JOB_POLL = 1.0  # seconds between looks for a job to join


def resolve(settings: Settings) -> str:
    return database.resolve_dsn(settings.dsn, settings.home)


def db_url(dsn: str, *, show_password: bool) -> int:
    print(dsn if show_password else database.mask_dsn(dsn))
    return EXIT_OK


def db_stop(settings: Settings) -> int:
    if database.stop_embedded(settings.home):
        print("embedded PostgreSQL stopped.")
    else:
        print("embedded PostgreSQL is not running.")
    return EXIT_OK


def show_config(settings: Settings, sources: dict[str, str]) -> int:
    for key, value in settings.as_dict().items():
        if key == "dsn" and value:
            value = database.mask_dsn(value)
        print(f"{key} = {value!r}  # {sources[key]}")
    return EXIT_OK


async def migrate(dsn: str) -> int:
    async with database.connection(dsn) as conn:
        applied = await apply_migrations(conn)
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "the schema is up to date.")
    return EXIT_OK


async def export(dsn: str, job_ref: str, *, fmt: str, path: str | None, only: str | None, csv_raw: bool = False) -> int:
    out = export_file(path, fmt)  # a bad -o fails before the database is touched
    try:
        await prepare_database(dsn)
        async with database.connection(dsn) as conn:
            job = await find_job(conn, job_ref)
            count = await export_job(conn, job.id, fmt=fmt, path=path, only=only, out=out, csv_raw=csv_raw)
    except BaseException:
        if out is not None:
            out.discard()
        raise
    if path and path != "-":
        print(f"exported {count} records to {path}", file=sys.stderr)
    return EXIT_OK


async def status(dsn: str, job_ref: str | None, *, as_json: bool, heartbeat_seconds: float) -> int:
    await prepare_database(dsn)
    async with database.connection(dsn) as conn:
        if job_ref is None:
            latest = await latest_job_id(conn)
            if latest is None:
                print("no jobs yet.")
                return EXIT_OK
            job_ref = str(latest)
        job = await find_job(conn, job_ref)
        summary = await job_summary(conn, job.id)
        counts = await job_counts(conn, job.id)
        summary["chunks"] = counts.chunks()
        workers = await registry.live_workers(conn, job.id, registry.LIVE_BEATS * heartbeat_seconds)
    rate = sum(float(w["rate"]) for w in workers)
    remaining = counts.to_fetch - counts.fetched
    summary["progress"] = {
        "rows_read": counts.rows_read,
        "to_fetch": counts.to_fetch,
        "fetched": counts.fetched,
        "ingest_done": job.ingest_done,
        "rate_per_s": round(rate, 1),
        "eta_s": round(remaining / rate) if rate > 0 and job.ingest_done else None,
    }
    summary["hosts"] = registry.by_host([dict(w) for w in workers])
    summary["workers"] = [
        {
            "worker": w["worker_id"],
            "host": w["host"],
            "pid": w["pid"],
            "fetched": w["fetched"],
            "rate_per_s": round(float(w["rate"]), 1),
            "last_seen": w["heartbeat_at"].isoformat(),
        }
        for w in workers
    ]
    if as_json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        from crawler.job.progress import render_summary

        render_summary(summary, Console())
        c, p = summary["chunks"], summary["progress"]
        print(f"chunks: {c['pending']} pending, {c['leased']} leased, {c['done']} done")
        eta = f", eta {p['eta_s']}s" if p["eta_s"] is not None else ""
        print(
            f"progress: {p['fetched']}/{p['to_fetch']} fetched of {p['rows_read']} rows read, {p['rate_per_s']}/s{eta}"
        )
        for h in summary["hosts"]:  # names a machine gave itself: printed, never acted on
            print(
                f"host {printable(str(h['host']))}: {h['workers']} workers, {h['fetched']} fetched, {h['rate_per_s']}/s"
            )
        for w in summary["workers"]:
            print(
                f"worker {printable(str(w['worker']))}: {w['fetched']} fetched, {w['rate_per_s']}/s,"
                f" last seen {w['last_seen']}"
            )
    return EXIT_OK


async def jobs(dsn: str) -> int:
    await prepare_database(dsn)
    async with database.connection(dsn) as conn:
        rows = await job_list(conn)
    from crawler.job.progress import shown

    table = Table("id", "name", "state", "rows read", "results", "created")
    for r in rows:
        table.add_row(
            str(r["id"]),
            shown(r["name"]),
            shown(r["state"]),
            str(r["rows_read"]),
            str(r["results"]),
            r["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)
    return EXIT_OK


def worker(dsn: str, settings: Settings, job_ref: str | None) -> int:
    """`crawler worker`: join the named job, or wait for the next unfinished one; leave when it
    has nothing left for this machine."""
    import uvloop

    from crawler.job.processes import join_job
    from crawler.metrics import Exporter

    job = uvloop.run(_job_to_join(dsn, settings, job_ref))
    ref = job.name or job.id
    if job.state == JobState.DONE:
        print(f"crawler: job {ref} is already complete.", file=sys.stderr)
        return EXIT_OK
    joined = for_job(job.settings, settings)
    print(
        f"crawler: joining job {ref} with {joined.effective_workers()} worker processes"
        f" of {joined.concurrency} fetch tasks each.",
        file=sys.stderr,
    )
    with Exporter.start(joined) or contextlib.nullcontext() as exporter:
        return uvloop.run(join_job(dsn, job, joined, exporter=exporter))


async def _job_to_join(dsn: str, settings: Settings, job_ref: str | None) -> Job:
    await prepare_database(dsn)
    async with database.LedgerConnection(dsn, outage_limit=settings.db_outage_limit) as db:
        if job_ref is not None:
            return await db.run(find_job, job_ref)
        told = False
        while (job := await db.run(registry.open_job)) is None:
            if not told:
                print("crawler: waiting for a job to start (Ctrl-C to stop).", file=sys.stderr)
                told = True
            await asyncio.sleep(JOB_POLL)
        return job
