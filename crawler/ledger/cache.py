"""The cross-job response cache (--cache-ttl): a request answered by an earlier job and still
fresh is served without a request; an expired one is revalidated with If-None-Match /
If-Modified-Since, and a 304 is a cache hit. Entries live in PostgreSQL, keyed by fingerprint;
this process holds none of them beyond the chunk at hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from crawler.errors import UsageError
from crawler.kinds import ANSWERED_KINDS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# Outcomes worth remembering: answers the server would give again, not transient failures.
CACHEABLE_STATUSES = frozenset(range(200, 300)) | {301, 308, 404, 410}


def parse_duration(text: str | float | int) -> float:
    """Seconds from '90', '90s', '15m', '2h', '1d' or '1w'."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"'{text}' is not a duration; write it like 90s, 15m, 2h or 1d.")
    return float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]


@dataclass(slots=True, frozen=True)
class CachedResponse:
    status: int
    final_url: str | None
    body_bytes: int | None
    body_sha256: bytes | None
    etag: str | None
    last_modified: str | None
    fresh: bool

    def validators(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


async def lookup(conn: asyncpg.Connection, fingerprints: list[bytes], ttl: float) -> dict[bytes, CachedResponse]:
    """Entries for these fingerprints that are fresh, or stale but revalidatable."""
    rows = await conn.fetch(
        "SELECT fingerprint, status, final_url, body_bytes, body_sha256, etag, last_modified,"
        " fetched_at > now() - make_interval(secs => $2) AS fresh"
        " FROM response_cache WHERE fingerprint = ANY($1::bytea[])",
        fingerprints,
        ttl,
    )
    found = {}
    for r in rows:
        entry = CachedResponse(
            r["status"], r["final_url"], r["body_bytes"], r["body_sha256"], r["etag"], r["last_modified"], r["fresh"]
        )
        if entry.fresh or entry.validators():
            found[r["fingerprint"]] = entry
    return found


def cache_row(
    fingerprint: bytes,
    job_id: int,
    *,
    status: int | None,
    error_kind: str | None,
    final_url: str | None,
    body_bytes: int | None,
    body_sha256: bytes | None,
    etag: str | None,
    last_modified: str | None,
) -> tuple | None:
    """The row to remember for a fetched outcome, or None when it is not worth remembering."""
    if status not in CACHEABLE_STATUSES or error_kind not in ANSWERED_KINDS:
        return None
    return (fingerprint, status, final_url, body_bytes, body_sha256, etag, last_modified, job_id)


async def store(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """Remember (or refresh) outcomes; the newest answer wins."""
    if rows:
        await conn.executemany(
            "INSERT INTO response_cache (fingerprint, status, final_url, body_bytes, body_sha256, etag,"
            " last_modified, job_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (fingerprint) DO UPDATE SET status = EXCLUDED.status, final_url = EXCLUDED.final_url,"
            " body_bytes = EXCLUDED.body_bytes, body_sha256 = EXCLUDED.body_sha256, etag = EXCLUDED.etag,"
            " last_modified = EXCLUDED.last_modified, job_id = EXCLUDED.job_id, fetched_at = now()",
            rows,
        )


async def touch(conn: asyncpg.Connection, fingerprints: list[bytes]) -> None:
    """A 304 confirmed these entries: they are fresh again."""
    if fingerprints:
        await conn.execute(
            "UPDATE response_cache SET fetched_at = now() WHERE fingerprint = ANY($1::bytea[])", fingerprints
        )
