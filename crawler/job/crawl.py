"""The crawl and resume commands end to end: open the database, apply migrations, create or find
the job, run the supervisor, and report. The CLI calls these; they return an exit code.

The processes, their tasks and what each owns: docs/ARCHITECTURE.md."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import orjson
from rich.console import Console

from crawler.errors import EXIT_OK, InputError, UsageError
from crawler.job import refetch
from crawler.job.inputs import open_input
from crawler.job.progress import ProgressView, render_summary
from crawler.job.signals import unless_signalled
from crawler.job.standby import Standby
from crawler.job.supervisor import Supervisor
from crawler.ledger.database import connection
from crawler.ledger.jobs import Job, create_job, find_job, set_job_state, unfinished_job
from crawler.ledger.migrate import apply_migrations
from crawler.ledger.reruns import reopen_for_retry
from crawler.ledger.summary import job_summary
from crawler.metrics import Exporter
from crawler.settings import Settings, flag_name, for_job, policy_flags_changing
from crawler.states import JobState

T = TypeVar("T")


async def prepare_database(dsn: str) -> None:
    async with connection(dsn) as conn:
        await apply_migrations(conn)


def _report(outcome, summary: dict | None, *, summary_json: str | None, quiet: bool, console: Console) -> int:
    ref = outcome.job.name or outcome.job.id
    if summary is None:
        print(f"crawler: the summary was skipped; `crawler status {ref}` shows the job.", file=sys.stderr)
    else:
        if summary_json:
            Path(summary_json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if not quiet:
            render_summary(summary, console)
            if outcome.exit_code == EXIT_OK:
                console.print(f"export with: crawler export {ref} --format jsonl -o results.jsonl")
    if outcome.message:
        print(f"crawler: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


async def crawl(
    dsn: str,
    settings: Settings,
    *,
    input_path: str,
    url_column: str | None,
    job_name: str | None,
    summary_json: str | None,
    quiet: bool,
    resume_existing: bool = False,
    standby: Standby | None = None,
    sources: Mapping[str, str] | None = None,
) -> int:
    started = time.monotonic()
    # noqa reason: once, before the crawl starts anything else on the loop.
    source = "-" if input_path == "-" else str(Path(input_path).resolve())  # noqa: ASYNC240
    await prepare_database(dsn)
    if resume_existing:
        async with connection(dsn) as conn:
            unfinished = await unfinished_job(conn, name=job_name, input=source)
        if unfinished is not None:
            return await resume(
                dsn,
                settings,
                job_ref=str(unfinished.id),
                summary_json=summary_json,
                quiet=quiet,
                standby=standby,
                sources=sources,
            )
    reader = open_input(input_path, url_column=url_column, sort_query=settings.sort_query)
    try:
        async with connection(dsn) as conn:
            unfinished = await unfinished_job(conn, name=None, input=source) if source != "-" else None
            if unfinished is not None and not quiet:
                ref = unfinished.name or unfinished.id
                print(
                    f"crawler: note: job {ref} for this input is unfinished; this starts a new job"
                    f" (`crawler resume {ref}` or --resume would finish that one).",
                    file=sys.stderr,
                )
            settings_doc = {k: v for k, v in settings.as_dict().items() if k != "dsn"}
            settings_doc["url_column"] = url_column
            job = await create_job(conn, name=job_name, input=source, settings=settings_doc)
    except BaseException:
        reader.close()
        raise
    return await _supervise(
        dsn, settings, job, reader, summary_json=summary_json, quiet=quiet, started=started, standby=standby
    )


def job_policy(job: Job, settings: Settings, sources: Mapping[str, str] | None) -> Settings:
    """The settings a resumed or retried job runs with: its own policy as its crawl stored it, and
    this run's machine settings (capacity, metrics, database); --allow-net adds to the job's list.
    A policy flag that would change the job's policy is refused: the job's rows so far were
    fetched under that policy, and the rest must be too (a new job can have another one)."""
    changing = policy_flags_changing(job.settings, settings, sources or {})
    if changing:
        ref = job.name or job.id
        shown = ", ".join(f"{flag_name(key)} (the job has {key} = {job.settings[key]!r})" for key in changing)
        raise UsageError(
            f"{shown} would change the policy job {ref} was started with; a resumed or retried job"
            f" keeps its policy, so leave {'it' if len(changing) == 1 else 'them'} out"
            f" or start a new job."
        )
    return for_job(job.settings, settings)


async def resume(
    dsn: str,
    settings: Settings,
    *,
    job_ref: str,
    summary_json: str | None,
    quiet: bool,
    standby: Standby | None = None,
    sources: Mapping[str, str] | None = None,
) -> int:
    started = time.monotonic()
    await prepare_database(dsn)
    async with connection(dsn) as conn:
        job = await find_job(conn, job_ref)
    settings = job_policy(job, settings, sources)
    if job.state == JobState.DONE:
        print(f"crawler: job {job.name or job.id} is already complete.", file=sys.stderr)
        return EXIT_OK
    async with connection(dsn) as conn:
        await set_job_state(conn, job.id, JobState.RUNNING if job.ingest_done else JobState.INGESTING)
    reader = None
    if not job.ingest_done:
        if job.input == "-":
            raise InputError(
                "this job read its input from stdin and stopped before reading all of it; it cannot be resumed."
            )
        reader = open_input(
            job.input, url_column=job.settings.get("url_column"), sort_query=job.settings.get("sort_query", False)
        )
    return await _supervise(
        dsn, settings, job, reader, summary_json=summary_json, quiet=quiet, started=started, standby=standby
    )


async def retry(
    dsn: str,
    settings: Settings,
    *,
    job_ref: str,
    kinds: str | None,
    statuses: str | None,
    summary_json: str | None,
    quiet: bool,
    standby: Standby | None = None,
    sources: Mapping[str, str] | None = None,
) -> int:
    """`crawler retry`: fetch again the rows of a finished job whose outcome matches, with the
    job's policy; resumable like any job, since it is the job itself that runs again."""
    started = time.monotonic()
    await prepare_database(dsn)
    async with connection(dsn) as conn:
        job = await find_job(conn, job_ref)
        settings = job_policy(job, settings, sources)
        chosen = refetch.selection(kinds, statuses, settings.retry_statuses)
        reopened = await reopen_for_retry(conn, job.id, kinds=sorted(chosen.kinds), statuses=chosen.statuses)
        if reopened is not None and reopened.rows:
            job = await find_job(conn, job.id)
    ref = job.name or job.id
    if reopened is None:
        raise UsageError(
            f"job {ref} is not finished; `crawler resume {ref}` finishes it, and then"
            f" `crawler retry {ref}` fetches its failures again."
        )
    if not reopened.rows:
        print(
            f"crawler: no result of job {ref} is one of: {chosen.describe()}; nothing to fetch again.", file=sys.stderr
        )
        return EXIT_OK
    if not quiet:
        shared = reopened.rows - reopened.fetches
        print(
            f"crawler: fetching {reopened.fetches} requests of job {ref} again ({chosen.describe()})"
            + (f"; {shared} duplicate rows share their outcome." if shared else "."),
            file=sys.stderr,
        )
    return await _supervise(
        dsn,
        settings,
        job,
        None,
        summary_json=summary_json,
        quiet=quiet,
        started=started,
        standby=standby,
        fetching=reopened.fetches,
    )


async def _supervise(
    dsn, settings, job, reader, *, summary_json, quiet, started, standby, fetching: int | None = None
) -> int:
    """Run the job to its end and report. `fetching`: how many requests this run fetches, when it
    is not the job's whole (a retry), so that the rate is this run's."""
    console = Console()
    with (
        reader or contextlib.nullcontext(),  # the ingest closes it; this too, if the supervisor fails first
        Exporter.start(settings) or contextlib.nullcontext() as exporter,
        ProgressView(quiet=quiet, interval=settings.progress_interval) as view,
    ):
        supervisor = Supervisor(dsn, settings, progress=view, exporter=exporter, standby=standby)
        with supervisor.on_signals():
            outcome = await supervisor.run(job, reader)
            summary = await unless_signalled(_read_summary(dsn, job.id, started))
    if summary is not None and fetching is not None and outcome.exit_code == EXIT_OK:
        summary["requests_per_s"] = round(fetching / summary["elapsed_s"], 1) if summary["elapsed_s"] > 0 else 0.0
    return _report(outcome, summary, summary_json=summary_json, quiet=quiet, console=console)


async def _read_summary(dsn: str, job_id: int, started: float) -> dict:
    async with connection(dsn) as conn:
        return await job_summary(conn, job_id, elapsed_s=time.monotonic() - started)
