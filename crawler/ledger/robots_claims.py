"""robots.txt per job and host (--robots obey): one worker claims a host's robots.txt and
fetches it, every worker reads the decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import asyncpg


class RobotsRecord(NamedTuple):
    """A host's decided robots.txt as the ledger holds it (robots.RobotsOutcome's fields)."""

    verdict: str
    body: str
    reason: str


class RobotsClaims(NamedTuple):
    decided: dict[str, RobotsRecord]  # host -> its decision
    claimed: list[str]  # hosts whose robots.txt this worker now fetches; the others' are under way elsewhere


async def claim_robots(
    conn: asyncpg.Connection,
    job_id: int,
    hosts: Sequence[str],
    owner: str,
    *,
    claim_seconds: float,
    live_seconds: float,
    reuse_ttl: float,
) -> RobotsClaims:
    """For each host: its decision if the job has one; else the right to fetch it — a host
    nobody claimed, or whose claimer stopped beating or let the claim expire (a killed worker).
    With `reuse_ttl`, a decision of another job younger than that (a robots.txt answered, not an
    outage) is this job's at once, as --cache-ttl reuses any response."""
    hosts = list(hosts)
    async with conn.transaction():
        if reuse_ttl > 0:
            await conn.execute(
                "INSERT INTO robots (job_id, host, verdict, body, reason, decided_at, reused_from)"
                " SELECT DISTINCT ON (host) $1, host, verdict, body, reason, decided_at, job_id FROM robots"
                " WHERE host = ANY($2::text[]) AND job_id <> $1 AND verdict IN ('rules', 'allow_all')"
                "   AND decided_at > now() - make_interval(secs => $3)"
                " ORDER BY host, decided_at DESC ON CONFLICT DO NOTHING",
                job_id,
                hosts,
                reuse_ttl,
            )
        claimed = [
            r["host"]
            for r in await conn.fetch(
                "INSERT INTO robots (job_id, host, owner, claim_expires)"
                " SELECT $1, h, $3, now() + make_interval(secs => $4) FROM unnest($2::text[]) AS h"
                " ON CONFLICT DO NOTHING RETURNING host",
                job_id,
                hosts,
                owner,
                claim_seconds,
            )
        ]
        if len(claimed) < len(hosts):
            claimed += [
                r["host"]
                for r in await conn.fetch(
                    "UPDATE robots r SET owner = $3, claim_expires = now() + make_interval(secs => $4)"
                    " WHERE r.job_id = $1 AND r.host = ANY($2::text[]) AND r.verdict IS NULL AND r.owner <> $3"
                    "   AND (r.claim_expires < now() OR NOT EXISTS (SELECT 1 FROM workers w"
                    "        WHERE w.job_id = $1 AND w.worker_id = r.owner AND w.stopped_at IS NULL"
                    "          AND w.heartbeat_at > now() - make_interval(secs => $5)))"
                    " RETURNING r.host",
                    job_id,
                    hosts,
                    owner,
                    claim_seconds,
                    live_seconds,
                )
            ]
        decided = await conn.fetch(
            "SELECT host, verdict, body, reason FROM robots"
            " WHERE job_id = $1 AND host = ANY($2::text[]) AND verdict IS NOT NULL",
            job_id,
            hosts,
        )
    return RobotsClaims(
        {r["host"]: RobotsRecord(r["verdict"], r["body"] or "", r["reason"] or "") for r in decided}, claimed
    )


async def decide_robots(
    conn: asyncpg.Connection, job_id: int, host: str, record: RobotsRecord, attempts: int
) -> RobotsRecord:
    """Store a host's decision, unless another worker stored one first (ours was presumed dead):
    return the decision that holds, the same for every worker. One statement: the outer SELECT
    reads the row as it was before the UPDATE, which is the other worker's decision when ours
    was not stored."""
    row = await conn.fetchrow(
        "WITH stored AS (UPDATE robots SET verdict = $3, body = $4, reason = $5, attempts = $6, decided_at = now(),"
        "   owner = NULL, claim_expires = NULL WHERE job_id = $1 AND host = $2 AND verdict IS NULL"
        "   RETURNING verdict, body, reason)"
        " SELECT verdict, body, reason FROM stored"
        " UNION ALL SELECT verdict, body, reason FROM robots WHERE job_id = $1 AND host = $2"
        "   AND verdict IS NOT NULL AND NOT EXISTS (SELECT 1 FROM stored)",
        job_id,
        host,
        record.verdict,
        record.body,
        record.reason,
        attempts,
    )
    return RobotsRecord(row["verdict"], row["body"] or "", row["reason"] or "") if row else record


async def robots_counts(conn: asyncpg.Connection, job_id: int) -> dict:
    """{"hosts": {verdict: hosts}, "requests": robots.txt requests made}; a decision reused from
    another job made none. One primary-key range of a small table (empty under `ignore`)."""
    rows = await conn.fetch(
        "SELECT verdict, count(*) AS hosts, coalesce(sum(attempts), 0) AS fetches FROM robots"
        " WHERE job_id = $1 AND verdict IS NOT NULL GROUP BY verdict",
        job_id,
    )
    return {"hosts": {r["verdict"]: r["hosts"] for r in rows}, "requests": sum(r["fetches"] for r in rows)}


async def renew_robots_claims(conn: asyncpg.Connection, job_id: int, owner: str, claim_seconds: float) -> None:
    await conn.execute(
        "UPDATE robots SET claim_expires = now() + make_interval(secs => $3)"
        " WHERE job_id = $1 AND owner = $2 AND verdict IS NULL",
        job_id,
        owner,
        claim_seconds,
    )


async def release_robots_claims(conn: asyncpg.Connection, job_id: int, owner: str) -> None:
    """A draining worker's unfinished robots.txt fetches, given back for the next to take at once."""
    await conn.execute("DELETE FROM robots WHERE job_id = $1 AND owner = $2 AND verdict IS NULL", job_id, owner)
