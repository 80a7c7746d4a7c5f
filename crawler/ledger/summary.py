"""A job's totals, computed by PostgreSQL from its results: the summary printed at the end of a
crawl, written by --summary-json and shown by `crawler status`."""

from __future__ import annotations

import asyncpg

from crawler.ledger.quarantine import quarantined_chunks
from crawler.ledger.robots_claims import robots_counts
from crawler.states import JobState
from crawler.urls import mask_password


async def job_summary(conn: asyncpg.Connection, job_id: int, *, elapsed_s: float | None = None) -> dict:
    totals = await conn.fetchrow(
        "SELECT count(*) AS requests,"
        " count(*) FILTER (WHERE NOT from_cache) AS fetched,"
        " count(*) FILTER (WHERE from_cache) AS from_cache,"
        " count(*) FILTER (WHERE error_kind IS NULL) AS ok,"
        " count(*) FILTER (WHERE error_kind IS NOT NULL) AS failed,"
        " coalesce(sum(attempts - 1) FILTER (WHERE attempts > 1), 0) AS retries,"
        " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY elapsed_ms)"
        "   FILTER (WHERE NOT from_cache) AS latency"
        " FROM results WHERE job_id = $1",
        job_id,
    )
    job = await conn.fetchrow(
        "SELECT id, name, state, rows_read, extract(epoch FROM coalesce(finished_at, now()) - created_at) AS age,"
        " extract(epoch FROM first_fetch_at - created_at) AS first_fetch"
        " FROM jobs WHERE id = $1",
        job_id,
    )
    invalid = await conn.fetchval("SELECT count(*) FROM invalid_rows WHERE job_id = $1", job_id)
    cache_kinds = dict(
        await conn.fetch(
            "SELECT cache_kind, count(*) FROM results WHERE job_id = $1 AND cache_kind IS NOT NULL GROUP BY cache_kind",
            job_id,
        )
    )
    statuses = await conn.fetch(
        "SELECT status, count(*) AS n FROM results WHERE job_id = $1 AND status IS NOT NULL"
        " GROUP BY status ORDER BY status",
        job_id,
    )
    # Counted from results alone; the example (the first row of each kind) is one primary-key
    # lookup: a scalar subquery is never flattened into a join, so it runs once per kind on every
    # PostgreSQL version. A join here is planned as a nested loop over the whole job while the job
    # is newer than the table statistics (quadratic: seconds at 20 000 rows, hours at a million).
    # Every other statement here reads the one table, linear in the job whatever its plan.
    kinds = await conn.fetch(
        "SELECT k.error_kind, k.n,"
        " (SELECT q.url FROM requests q WHERE q.job_id = $1 AND q.row_no = k.first_row) AS example"
        " FROM (SELECT error_kind, count(*) AS n, min(row_no) AS first_row FROM results"
        "       WHERE job_id = $1 AND error_kind IS NOT NULL GROUP BY error_kind) AS k"
        " ORDER BY k.n DESC",
        job_id,
    )
    quarantined = await quarantined_chunks(conn, job_id)
    robots = await robots_counts(conn, job_id)
    elapsed = float(job["age"]) if elapsed_s is None else elapsed_s
    latency = totals["latency"] or [None, None, None]
    return {
        "job_id": job["id"],
        "job_name": job["name"],
        "state": job["state"],
        "rows": totals["requests"] + invalid if job["state"] == JobState.DONE else job["rows_read"],
        "requests": totals["requests"],
        "fetched": totals["fetched"],
        "from_cache": totals["from_cache"],
        "invalid": invalid,
        "ok": totals["ok"],
        "failed": totals["failed"],
        "retries": int(totals["retries"]),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(totals["fetched"] / elapsed, 1) if elapsed > 0 else 0.0,
        "time_to_first_fetch_s": round(float(job["first_fetch"]), 3) if job["first_fetch"] is not None else None,
        "latency_ms": {"p50": latency[0], "p95": latency[1], "p99": latency[2]},
        # duplicate: joined an identical request of this job (single flight); fresh: an earlier
        # job's stored response; revalidated: a stored response the server confirmed with 304.
        "cache": {kind: cache_kinds.get(kind, 0) for kind in ("duplicate", "fresh", "revalidated")},
        "statuses": {str(r["status"]): r["n"] for r in statuses},
        # the example is a row's URL as sent: a password in it is shown as ***
        "errors": {r["error_kind"]: {"count": r["n"], "example": mask_password(r["example"])} for r in kinds},
        # Chunks that kept killing their workers: their rows without a result are `internal`.
        "quarantined": [q._asdict() for q in quarantined],
        # --robots obey: hosts by what their robots.txt decided, and the requests that took.
        "robots": robots,
    }
