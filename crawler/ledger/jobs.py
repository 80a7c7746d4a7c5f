"""Jobs in the ledger: created, found by name or number, their state, and their live counts."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from crawler.errors import CrawlerError, JobNotFound
from crawler.states import ChunkState, JobState


class JobExists(CrawlerError):
    """A job of that name exists; the user is told how to resume it."""


@dataclass(slots=True, frozen=True)
class Job:
    id: int
    name: str | None
    input: str
    state: JobState
    settings: dict
    rows_read: int
    ingest_done: bool


@dataclass(slots=True)
class JobCounts:
    """A job's live counts (job_counts), polled for progress, `crawler status` and the metrics;
    the supervisor adds what only it knows: whether ingest is over and how far into the input."""

    rows_read: int
    state: str
    to_fetch: int  # rows to fetch, duplicates and invalid rows left out
    fetched: int
    ok: int
    failed: int
    invalid: int
    duplicates: int
    pending: int  # chunks by state
    leased: int
    done: int
    ingest_done: bool = True
    bytes_read: int = 0  # of the input file, compressed
    bytes_total: int | None = None  # None: its size is unknown (stdin)

    def chunks(self) -> dict[str, int]:
        """The job's chunks by state, keyed by the state's name."""
        return {state.value: getattr(self, state.value) for state in ChunkState}


async def create_job(conn: asyncpg.Connection, *, name: str | None, input: str, settings: dict) -> Job:
    import orjson

    try:
        row = await conn.fetchrow(
            "INSERT INTO jobs (name, input, settings) VALUES ($1, $2, $3::jsonb) RETURNING *",
            name,
            input,
            orjson.dumps(settings).decode(),
        )
    except asyncpg.UniqueViolationError:
        raise JobExists(
            f"a job named '{name}' already exists; run `crawler resume {name}` to finish it,"
            f" or choose another --job-name."
        ) from None
    return _job(row)


def _job(row: asyncpg.Record) -> Job:
    import orjson

    settings = row["settings"]
    if isinstance(settings, str):
        settings = orjson.loads(settings)
    return Job(
        row["id"], row["name"], row["input"], JobState(row["state"]), settings, row["rows_read"], row["ingest_done"]
    )


async def fetch_timing(conn: asyncpg.Connection, job_id: int) -> tuple[asyncpg.Record, asyncpg.Record]:
    """A finished job's timing, for `crawler bench`: from its creation to the first fetch and
    from there to its end (the job's row); results, fetches, the window in which they were made
    and the fetches' latency percentiles (its results)."""
    job = await conn.fetchrow(
        "SELECT extract(epoch FROM first_fetch_at - created_at) AS to_first,"
        " extract(epoch FROM finished_at - first_fetch_at) AS fetch_to_finish"
        " FROM jobs WHERE id = $1",
        job_id,
    )
    results = await conn.fetchrow(
        "SELECT count(*) AS rows, count(*) FILTER (WHERE NOT from_cache) AS fetched,"
        " extract(epoch FROM max(fetched_at) FILTER (WHERE NOT from_cache)"
        "   - (SELECT first_fetch_at FROM jobs WHERE id = $1)) AS fetch_window,"
        " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY elapsed_ms)"
        "   FILTER (WHERE NOT from_cache) AS latency"
        " FROM results WHERE job_id = $1",
        job_id,
    )
    return job, results


async def latest_job_id(conn: asyncpg.Connection) -> int | None:
    """The newest job's id (what `crawler status` shows when no job is named); None if none."""
    return await conn.fetchval("SELECT max(id) FROM jobs")


async def job_list(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every job, oldest first, with its results so far (`crawler jobs`)."""
    return await conn.fetch(
        "SELECT j.id, j.name, j.state, j.rows_read, j.created_at,"
        " (SELECT count(*) FROM results r WHERE r.job_id = j.id) AS results"
        " FROM jobs j ORDER BY j.id"
    )


async def find_job(conn: asyncpg.Connection, ref: str | int) -> Job:
    """A job by its id or its name."""
    ref = str(ref)
    row = await conn.fetchrow("SELECT * FROM jobs WHERE name = $1", ref)
    if row is None and ref.isdigit():
        row = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", int(ref))
    if row is None:
        raise JobNotFound(f"no job with id or name '{ref}'; `crawler jobs` lists them.")
    return _job(row)


async def unfinished_job(conn: asyncpg.Connection, *, name: str | None, input: str) -> Job | None:
    """The latest job of that name (or, without a name, of that input) that is not done."""
    if name is not None:
        row = await conn.fetchrow("SELECT * FROM jobs WHERE name = $1 AND state <> 'done'", name)
    else:
        row = await conn.fetchrow(
            "SELECT * FROM jobs WHERE input = $1 AND state <> 'done' ORDER BY id DESC LIMIT 1", input
        )
    return _job(row) if row else None


async def job_phase(conn: asyncpg.Connection, job_id: int) -> tuple[str, bool]:
    """The job's state and whether its ingest is over: what a worker polls to know it may stop."""
    row = await conn.fetchrow("SELECT state, ingest_done FROM jobs WHERE id = $1", job_id)
    return row["state"], row["ingest_done"]


async def set_job_state(conn: asyncpg.Connection, job_id: int, state: JobState) -> None:
    await conn.execute(
        "UPDATE jobs SET state = $2, finished_at = CASE WHEN $2 = 'done' THEN now() END WHERE id = $1",
        job_id,
        state,
    )


async def job_counts(conn: asyncpg.Connection, job_id: int) -> JobCounts:
    """Live counts for progress, from the small chunks table (cheap to poll). The job's own
    columns come from scalar subqueries, not a join: one statement, one plan on every version."""
    row = await conn.fetchrow(
        "SELECT (SELECT rows_read FROM jobs WHERE id = $1) AS rows_read,"
        " (SELECT state FROM jobs WHERE id = $1) AS state,"
        " coalesce(sum(fetch_rows), 0)::bigint AS to_fetch, coalesce(sum(done_rows), 0)::bigint AS fetched,"
        " coalesce(sum(ok_rows), 0)::bigint AS ok, coalesce(sum(failed_rows), 0)::bigint AS failed,"
        " coalesce(sum(invalid_rows), 0)::bigint AS invalid,"
        " coalesce(sum(input_rows - invalid_rows - fetch_rows), 0)::bigint AS duplicates,"
        " count(*) FILTER (WHERE state = 'pending') AS pending,"
        " count(*) FILTER (WHERE state = 'leased') AS leased,"
        " count(*) FILTER (WHERE state = 'done') AS done"
        " FROM chunks WHERE job_id = $1",
        job_id,
    )
    return JobCounts(**row)
