"""What the person at the terminal sees while a job runs: a live rich display on a terminal, a
plain `progress:` line every few seconds otherwise (CI, docker logs, pipes), nothing with --quiet;
and the final summary table. It only reads the counts it is given: it never queries anything."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from crawler.fetch.storable import printable
from crawler.kinds import ErrorKind

if TYPE_CHECKING:
    from crawler.ledger.jobs import JobCounts

RATE_WINDOW_S = 10.0  # requests/s is measured over this much recent time, not since the start
WORKER_WINDOW_S = 20.0  # workers report every heartbeat (5 s): a wider window for their rates


@dataclass(slots=True)
class WorkerActivity:
    host: str
    pid: int
    fetched: int
    rate: float  # requests/s, over the recent heartbeats when there are two, else since it started


@dataclass(slots=True)
class Snapshot:
    """One moment of a job, in the words of the display."""

    done: int  # rows with their outcome decided: fetched, duplicates (served from the cache), invalid
    total: int | None  # rows in the input; None while reading stdin
    estimated: bool  # total is extrapolated from the bytes read so far
    fetched: int
    to_fetch: int | None  # requests to fetch in all (estimated while ingesting)
    rate: float  # requests/s over the last RATE_WINDOW_S
    ok: int
    failed: int
    cached: int
    invalid: int
    elapsed: float
    eta: float | None
    chunks: tuple[int, int, int]  # done, leased, pending
    workers: list[WorkerActivity] = field(default_factory=list)


def estimate_total(counts: JobCounts) -> tuple[int | None, bool]:
    """Rows in the whole input: exact once ingest is done; while ingesting, the rows read so far
    scaled by the share of the (compressed) bytes consumed; None when the size is unknown."""
    rows = counts.rows_read
    if counts.ingest_done:
        return rows, False
    read, total = counts.bytes_read, counts.bytes_total
    if not total or read <= 0 or rows <= 0:
        return None, True
    return max(rows, round(rows * total / read)), True


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _total(snap: Snapshot) -> str:
    if snap.total is None:
        return "?"
    return f"~{snap.total:,}" if snap.estimated else f"{snap.total:,}"


def plain_line(snap: Snapshot) -> str:
    """The line printed when the output is not a terminal; it always starts with 'progress:'."""
    share = f" ({100 * snap.done / snap.total:.1f}%)" if snap.total else ""
    return (
        f"progress: rows {snap.done:,}/{_total(snap)}{share}, {snap.rate:,.0f} req/s,"
        f" ok {snap.ok:,}, failed {snap.failed:,}, cached {snap.cached:,}, invalid {snap.invalid:,},"
        f" workers {len(snap.workers)}, elapsed {_duration(snap.elapsed)}, eta {_duration(snap.eta)}"
    )


def live_display(snap: Snapshot) -> RenderableType:
    """The live panel: rows done against the total, rate, outcomes, ETA, and each worker."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    bar = ProgressBar(total=snap.total or None, completed=snap.done, width=40)
    share = f"  {100 * snap.done / snap.total:.1f}%" if snap.total else ""
    note = " (estimated while reading the input)" if snap.estimated and snap.total is not None else ""
    head.add_row("rows", Text.assemble(f"{snap.done:,} / {_total(snap)}{share}{note}"))
    head.add_row("", bar)
    to_fetch = "?" if snap.to_fetch is None else f"{snap.to_fetch:,}"
    head.add_row("requests", f"{snap.fetched:,} / {to_fetch} fetched,  {snap.rate:,.0f}/s (last {RATE_WINDOW_S:.0f} s)")
    head.add_row(
        "outcomes",
        Text.assemble(
            ("ok ", "green"),
            f"{snap.ok:,}   ",
            ("failed ", "red"),
            f"{snap.failed:,}   ",
            ("cached ", "cyan"),
            f"{snap.cached:,}   ",
            ("invalid ", "yellow"),
            f"{snap.invalid:,}",
        ),
    )
    done, leased, pending = snap.chunks
    head.add_row("chunks", f"{done:,} done, {leased:,} leased, {pending:,} pending")
    head.add_row("time", f"elapsed {_duration(snap.elapsed)},  eta {_duration(snap.eta)}")
    if not snap.workers:
        return Group(head, Text("workers: none running", style="dim"))
    workers = Table("worker", "pid", "fetched", "rate", box=None, padding=(0, 2), header_style="bold")
    for w in snap.workers:
        workers.add_row(w.host, str(w.pid), f"{w.fetched:,}", f"{w.rate:,.0f}/s")
    return Group(head, Text(""), workers)


class ProgressView:
    """Fed by the supervisor with job_counts (plus ingest_done, bytes_read, bytes_total)
    and registry.live_workers rows, a few times a second; a context manager around the job."""

    def __init__(self, *, interval: float, quiet: bool = False, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.quiet = quiet
        self.interactive = not quiet and self.console.is_terminal
        self.interval = interval
        self._live: Live | None = None
        self._last_line: float | None = None
        self._unprinted: Snapshot | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._worker_samples: dict[str, deque[tuple[float, int]]] = {}
        self._started = time.monotonic()

    def __enter__(self) -> ProgressView:
        if self.interactive:
            self._live = Live(
                console=self.console, refresh_per_second=4, transient=False, redirect_stdout=True, redirect_stderr=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        elif self._unprinted is not None:  # the last state, so a log always ends with the final counts
            self._print(self._unprinted)

    def _rate(self, now: float, fetched: int) -> float:
        samples = self._samples
        if samples and fetched < samples[-1][1]:
            samples.clear()  # counts went back (a resume, a refused lease): start measuring anew
        samples.append((now, fetched))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        first_t, first_n = samples[0]
        return (fetched - first_n) / (now - first_t) if now > first_t else 0.0

    def _worker_rate(self, worker: dict) -> float:
        seen = worker.get("heartbeat_at")
        fallback = float(worker.get("rate") or 0.0)
        if not isinstance(seen, datetime):
            return fallback
        samples = self._worker_samples.setdefault(str(worker["worker_id"]), deque())
        t, fetched = seen.timestamp(), int(worker["fetched"])
        if not samples or t > samples[-1][0]:
            samples.append((t, fetched))
        while len(samples) > 2 and samples[1][0] <= t - WORKER_WINDOW_S:
            samples.popleft()
        first_t, first_n = samples[0]
        if t - first_t <= 0:
            return fallback
        return max(0.0, (fetched - first_n) / (t - first_t))

    def snapshot(self, counts: JobCounts, workers: list[dict], now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        total, estimated = estimate_total(counts)
        fetched, invalid, cached = int(counts.fetched), int(counts.invalid), int(counts.duplicates)
        to_fetch: int | None = int(counts.to_fetch)
        if estimated:
            rows = counts.rows_read
            to_fetch = round(counts.to_fetch * total / rows) if total and rows else None
        rate = self._rate(now, fetched)
        eta = None
        if to_fetch is not None:
            remaining = max(0, to_fetch - fetched)
            eta = 0.0 if remaining == 0 else (remaining / rate if rate > 0 else None)
        activity = [
            WorkerActivity(
                host=str(w.get("host", "")),
                pid=int(w.get("pid") or 0),
                fetched=int(w.get("fetched") or 0),
                rate=self._worker_rate(w),
            )
            for w in workers
        ]
        return Snapshot(
            done=fetched + invalid + cached,
            total=total,
            estimated=estimated,
            fetched=fetched,
            to_fetch=to_fetch,
            rate=rate,
            ok=int(counts.ok),
            failed=int(counts.failed),
            cached=cached,
            invalid=invalid,
            elapsed=now - self._started,
            eta=eta,
            chunks=(int(counts.done), int(counts.leased), int(counts.pending)),
            workers=activity,
        )

    def update(self, counts: JobCounts, workers: list[dict]) -> None:
        """counts: job_counts with ingest_done (and bytes_read/bytes_total for a file);
        workers: registry.live_workers rows as dicts."""
        if self.quiet:
            return
        now = time.monotonic()
        snap = self.snapshot(counts, workers, now)
        if self._live is not None:
            self._live.update(live_display(snap))
        elif self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            self._print(snap)
        else:
            self._unprinted = snap

    def note(self, text: str) -> None:
        """A one-off line for the person watching (above the live view on a terminal)."""
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _print(self, snap: Snapshot) -> None:
        self._unprinted = None
        print(plain_line(snap), file=self.stream, flush=True)


def shown(text: str | None) -> str:
    """Stored text (a job name, a URL) as a rich table or title shows it: no control character
    reaches the terminal, and brackets in it are printed, not read as markup."""
    return escape(printable(text)) if text else ""


def _histogram(statuses: dict[str, int]) -> Table:
    table = Table(
        "status",
        "count",
        "share",
        "",
        title="status codes",
        title_justify="left",
        box=None,
        padding=(0, 2),
        header_style="bold",
    )
    total = sum(statuses.values()) or 1
    widest = max(statuses.values())
    for code, count in statuses.items():
        style = "green" if code.startswith("2") else "yellow" if code.startswith("3") else "red"
        table.add_row(
            code,
            f"{count:,}",
            f"{100 * count / total:.1f}%",
            Text("█" * max(1, round(30 * count / widest)), style=style),
        )
    return table


def render_summary(summary: dict, console: Console) -> None:
    """The table at the end of a crawl (and in `crawler status`): totals, throughput, latency,
    the status-code histogram and each error kind with an example URL."""
    title = f"job {summary['job_id']}" + (f" ({shown(summary['job_name'])})" if summary.get("job_name") else "")
    totals = Table(
        title=f"{title}: {shown(summary['state'])}", title_justify="left", show_header=False, box=None, padding=(0, 2)
    )
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_column()
    rows = summary["rows"] or 0

    def share(n: int) -> str:
        return f"{100 * n / rows:.1f}%" if rows else ""

    totals.add_row("rows", f"{rows:,}", "")
    totals.add_row("fetched", f"{summary['fetched']:,}", share(summary["fetched"]))
    totals.add_row("cached", f"{summary['from_cache']:,}", share(summary["from_cache"]) + "  duplicates, fetched once")
    totals.add_row("invalid", f"{summary['invalid']:,}", share(summary["invalid"]))
    totals.add_row("ok", f"{summary['ok']:,}", share(summary["ok"]))
    totals.add_row("failed", f"{summary['failed']:,}", share(summary["failed"]))
    totals.add_row("retries", f"{summary['retries']:,}", "")
    elapsed = summary["elapsed_s"]
    totals.add_row("elapsed", f"{elapsed:,.1f}", "s" + (f"  ({_duration(elapsed)})" if elapsed >= 60 else ""))
    totals.add_row("throughput", f"{summary['requests_per_s']:,.0f}", "requests/s")
    if summary.get("time_to_first_fetch_s") is not None:
        totals.add_row("first fetch", f"{summary['time_to_first_fetch_s']:.2f}", "s after the start")
    lat = summary["latency_ms"]
    if lat["p50"] is not None:
        totals.add_row("latency", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f}", "ms  p50 / p95 / p99")
    parts: list[RenderableType] = [totals]
    if summary["statuses"]:
        parts += [Text(""), _histogram(summary["statuses"])]
    if summary["errors"]:
        errors = Table(
            "error",
            "count",
            "example",
            title="errors",
            title_justify="left",
            box=None,
            padding=(0, 2),
            header_style="bold",
        )
        errors.columns[2].overflow = "fold"  # a URL cut short could not be copied
        for kind, info in summary["errors"].items():
            errors.add_row(
                shown(kind),
                f"{info['count']:,}",
                shown(info["example"]),
                style="red" if kind != ErrorKind.BLOCKED else None,
            )
        parts += [Text(""), errors]
    for q in summary.get("quarantined", ()):
        parts.append(
            Text(
                f"quarantined: chunk {q['chunk_no']} (rows {q['first_row']}-{q['last_row']}), workers died"
                f" {q['deaths']} times holding it; {q['given_up']} rows stored as `internal`",
                style="red",
            )
        )
    console.print(Group(*parts))
