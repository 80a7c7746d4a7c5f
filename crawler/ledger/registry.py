"""The workers registry: which worker processes, on which hosts, take part in a job, each with a
heartbeat. `crawler status` shows it; workers count each other through it to share every host's
politeness budget across machines; a `crawler worker` with no job named finds its job here.
"""

from __future__ import annotations

import resource

import asyncpg

from crawler.ledger.jobs import Job, find_job

# A worker is live while its heartbeats keep coming: it beats every heartbeat_seconds, so three
# missed beats mean it is gone (killed, frozen or cut off), whatever its row says.
LIVE_BEATS = 3


async def register_worker(conn: asyncpg.Connection, job_id: int, worker_id: str, host: str, pid: int) -> None:
    await conn.execute(
        "INSERT INTO workers (job_id, worker_id, host, pid) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (job_id, worker_id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL",
        job_id,
        worker_id,
        host,
        pid,
    )


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. getrusage's ru_maxrss would do, but Linux carries
    it over exec from the process that started us, so a small worker of a big parent reports the
    parent's peak; /proc's VmHWM is this process's alone."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def worker_heartbeat(
    conn: asyncpg.Connection, job_id: int, worker_id: str, fetched: int, *, stopped: bool = False
) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # of the calling process: the worker's CPU
    await conn.execute(
        "UPDATE workers SET heartbeat_at = now(), fetched = $3,"
        " stopped_at = CASE WHEN $4 THEN now() ELSE stopped_at END,"
        " peak_rss_bytes = $5, cpu_seconds = $6"
        " WHERE job_id = $1 AND worker_id = $2",
        job_id,
        worker_id,
        fetched,
        stopped,
        peak_rss_bytes(),
        usage.ru_utime + usage.ru_stime,
    )


async def worker_usage(conn: asyncpg.Connection, job_id: int) -> list[asyncpg.Record]:
    """Every worker that took part in the job, first started first, with what it fetched and the
    CPU and peak memory it reported (`crawler bench`)."""
    return await conn.fetch(
        "SELECT worker_id, fetched, peak_rss_bytes, cpu_seconds FROM workers WHERE job_id = $1 ORDER BY started_at",
        job_id,
    )


async def live_workers(conn: asyncpg.Connection, job_id: int, within_seconds: float) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT worker_id, host, pid, fetched, started_at, heartbeat_at,"
        " fetched / greatest(extract(epoch FROM heartbeat_at - started_at), 0.001) AS rate"
        " FROM workers WHERE job_id = $1 AND stopped_at IS NULL"
        " AND heartbeat_at > now() - make_interval(secs => $2) ORDER BY worker_id",
        job_id,
        within_seconds,
    )


async def live_worker_count(conn: asyncpg.Connection, job_id: int, within_seconds: float) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM workers WHERE job_id = $1 AND stopped_at IS NULL"
        " AND heartbeat_at > now() - make_interval(secs => $2)",
        job_id,
        within_seconds,
    )


def by_host(workers: list[dict]) -> list[dict]:
    """Live workers grouped by host, each host with its worker count, fetched and rate."""
    hosts: dict[str, dict] = {}
    for w in workers:
        entry = hosts.setdefault(w["host"], {"host": w["host"], "workers": 0, "fetched": 0, "rate_per_s": 0.0})
        entry["workers"] += 1
        entry["fetched"] += int(w["fetched"])
        entry["rate_per_s"] = round(entry["rate_per_s"] + float(w["rate"]), 1)
    return sorted(hosts.values(), key=lambda h: h["host"])


async def open_job(conn: asyncpg.Connection) -> Job | None:
    """The oldest job still being ingested or fetched: what a worker with no job named joins."""
    job_id = await conn.fetchval("SELECT id FROM jobs WHERE state IN ('ingesting', 'running') ORDER BY id LIMIT 1")
    return None if job_id is None else await find_job(conn, job_id)
