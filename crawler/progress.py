"""What the person at the terminal sees while a job runs: a live rich display on a terminal, a
plain line every few seconds otherwise (CI, docker logs, pipes), nothing with --quiet; and the
final summary table."""

from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console
from rich.live import Live
from rich.table import Table


class ProgressView:
    def __init__(self, *, quiet: bool = False, interval: float = 5.0, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.quiet = quiet
        self.interactive = not quiet and self.console.is_terminal
        self.interval = interval
        self._live: Live | None = None
        self._last_line = 0.0
        self._samples: deque[tuple[float, int]] = deque(maxlen=20)
        self._started = time.monotonic()

    def __enter__(self) -> "ProgressView":
        if self.interactive:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def _rate(self, fetched: int) -> float:
        now = time.monotonic()
        self._samples.append((now, fetched))
        first_t, first_n = self._samples[0]
        return (fetched - first_n) / (now - first_t) if now > first_t else 0.0

    def update(self, counts: dict, workers: list[dict]) -> None:
        """counts: ledger.job_counts plus ingest_done (and bytes_read/bytes_total for a file);
        workers: ledger.live_workers rows as dicts."""
        if self.quiet:
            return
        fetched, to_fetch = counts["fetched"], counts["to_fetch"]
        rate = self._rate(fetched)
        remaining = to_fetch - fetched
        eta = f"{remaining / rate:.0f}s" if rate > 0 and counts.get("ingest_done") else "?"
        elapsed = time.monotonic() - self._started
        if self._live is not None:
            table = Table.grid(padding=(0, 2))
            table.add_row("rows read", f"{counts['rows_read']:,}", "chunks", f"{counts['done']}/{counts['done'] + counts['pending'] + counts['leased']}")
            table.add_row("fetched", f"{fetched:,}/{to_fetch:,}", "rate", f"{rate:,.0f}/s")
            table.add_row("workers", str(len(workers)), "elapsed", f"{elapsed:.0f}s  eta {eta}")
            self._live.update(table)
        elif time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            print(
                f"progress: rows read {counts['rows_read']}, fetched {fetched}/{to_fetch},"
                f" {rate:.0f}/s, chunks done {counts['done']}, workers {len(workers)}, elapsed {elapsed:.0f}s, eta {eta}",
                file=self.stream, flush=True,
            )


def render_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"job {summary['job_id']}" + (f" ({summary['job_name']})" if summary["job_name"] else ""),
                  show_header=False)
    for key in ("state", "rows", "requests", "fetched", "from_cache", "invalid", "ok", "failed", "retries",
                "elapsed_s", "requests_per_s"):
        table.add_row(key, str(summary[key]))
    lat = summary["latency_ms"]
    if lat["p50"] is not None:
        table.add_row("latency p50/p95/p99", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms")
    if summary["statuses"]:
        table.add_row("statuses", ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items()))
    for kind, info in summary["errors"].items():
        table.add_row(f"error {kind}", f"{info['count']} (e.g. {info['example']})")
    console.print(table)
