"""Dead workers' leases given back, and a chunk that keeps killing its workers given up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

# Holders of one chunk that die in a row before its rows are given up. A worker that dies once
# may have been killed for any reason; three, each holding that chunk alone after the first
# death (lease_chunk), point at something in the chunk itself.
QUARANTINE_AFTER = 3


class Quarantine(NamedTuple):
    chunk_no: int
    first_row: int
    last_row: int
    deaths: int
    given_up: int  # rows stored as `internal`, never fetched


@dataclass(slots=True, frozen=True)
class Released:
    """Dead workers' leases given back: the chunks each of them held, those quarantined, and the
    workers that died on chunks that had killed a worker before (a repeat: the chunk's doing)."""

    held: dict[str, list[int]]
    quarantined: list[Quarantine]
    repeats: frozenset[str] = frozenset()


async def release_dead_workers(
    conn: asyncpg.Connection,
    job_id: int,
    owners: Sequence[str],
    *,
    quarantine_after: int = QUARANTINE_AFTER,
) -> Released:
    """Give back every chunk leased by these owners, known to be dead, counting a death on each.
    A chunk at `quarantine_after` deaths is done instead: its rows still without a result are
    stored as `internal`, in the same transaction, so the job can finish."""
    async with conn.transaction():
        rows = await conn.fetch(
            # Locked in chunk order, as result writes lock them: two transactions never wait on
            # each other in a cycle.
            "WITH held AS (SELECT chunk_no, lease_owner FROM chunks WHERE job_id = $1 AND state = 'leased'"
            "              AND lease_owner = ANY($2::text[]) ORDER BY chunk_no FOR UPDATE)"
            " UPDATE chunks c SET deaths = c.deaths + 1, lease_owner = NULL, lease_expires = NULL,"
            "   state = CASE WHEN c.deaths + 1 >= $3 THEN 'done' ELSE 'pending' END,"
            "   quarantined = c.deaths + 1 >= $3"
            " FROM held WHERE c.job_id = $1 AND c.chunk_no = held.chunk_no"
            " RETURNING c.chunk_no, held.lease_owner, c.deaths, c.quarantined, c.first_row, c.last_row",
            job_id,
            list(owners),
            quarantine_after,
        )
        held: dict[str, list[int]] = {}
        first_deaths: set[str] = set()  # owners that held a chunk no worker had died on before
        quarantined = []
        for r in sorted(rows, key=lambda r: r["chunk_no"]):
            held.setdefault(r["lease_owner"], []).append(r["chunk_no"])
            if r["deaths"] == 1:
                first_deaths.add(r["lease_owner"])
            if r["quarantined"]:
                given_up = await _give_up_rows(
                    conn,
                    job_id,
                    r["chunk_no"],
                    r["first_row"],
                    r["last_row"],
                    f"workers died {r['deaths']} times on this chunk"
                    f" (chunk {r['chunk_no']}, rows {r['first_row']}-{r['last_row']});"
                    f" not fetched",
                )
                quarantined.append(Quarantine(r["chunk_no"], r["first_row"], r["last_row"], r["deaths"], given_up))
    return Released(held, quarantined, frozenset(held) - first_deaths)


async def _give_up_rows(
    conn: asyncpg.Connection, job_id: int, chunk_no: int, first_row: int, last_row: int, reason: str
) -> int:
    """The chunk's rows still without a result become `internal` results; its counts say so."""
    given_up = await conn.fetch(
        "INSERT INTO results (job_id, row_no, error_kind, error, attempts, from_cache)"
        " SELECT q.job_id, q.row_no, 'internal', $4, 0, false FROM requests q"
        " WHERE q.job_id = $1 AND q.row_no BETWEEN $2 AND $3 AND q.dup_of IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = $1 AND r.row_no = q.row_no)"
        " ON CONFLICT DO NOTHING RETURNING row_no",
        job_id,
        first_row,
        last_row,
        reason,
    )
    await conn.execute(
        "UPDATE chunks SET done_rows = fetch_rows, failed_rows = failed_rows + $3 WHERE job_id = $1 AND chunk_no = $2",
        job_id,
        chunk_no,
        len(given_up),
    )
    return len(given_up)


async def quarantined_chunks(conn: asyncpg.Connection, job_id: int) -> list[Quarantine]:
    rows = await conn.fetch(
        "SELECT c.chunk_no, c.first_row, c.last_row, c.deaths,"
        " (SELECT count(*) FROM results r WHERE r.job_id = $1 AND r.row_no BETWEEN c.first_row AND c.last_row"
        "  AND r.error_kind = 'internal' AND r.attempts = 0 AND NOT r.from_cache) AS given_up"
        " FROM chunks c WHERE c.job_id = $1 AND c.quarantined ORDER BY c.chunk_no",
        job_id,
    )
    return [Quarantine(r["chunk_no"], r["first_row"], r["last_row"], r["deaths"], r["given_up"]) for r in rows]
