"""Prometheus metrics (--metrics-port). Worker processes count into prometheus_client's
multiprocess files; the parent that spawned them serves their sum, with its own counts, over HTTP.

With metrics off a worker's hooks are calls to methods that do nothing, and prometheus_client is
never imported (35–40 ms of CPU in every process); nothing here changes what a crawl does.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from crawler.errors import UsageError

if TYPE_CHECKING:
    from crawler.fetch.fetcher import Attempt
    from crawler.ledger.jobs import JobCounts
    from crawler.settings import Settings

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # how prometheus_client finds the files; spawned workers inherit it
# Seconds, from a loopback answer to the default total timeout; write lag (one flush interval,
# longer during a database outage) fits the same scale.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CACHE_HITS_HELP = (
    "Rows served from the cache: duplicate (of an earlier row of the job, counted at ingest),"
    " fresh (an earlier job's response), revalidated (an earlier job's response, confirmed by a 304)"
)


class WorkerMetrics:
    """A worker process's counts, kept in its own files under PROMETHEUS_MULTIPROC_DIR.

    A request here is one HTTP attempt: a row retried twice is three requests and two retries.
    A label without a value (no status after a connect error, no error kind for a success) is "".
    """

    counting = True

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: a worker never serves; the parent reads the files.
        self.requests = Counter(
            "crawler_requests_total", "HTTP attempts by status and error kind", ["status", "error_kind"], registry=None
        )
        # labels() costs as much as the increment itself: look each pair up once.
        self._requests_of = functools.cache(lambda status, kind: self.requests.labels(str(status or ""), kind or ""))
        self.duration = Histogram(
            "crawler_request_duration_seconds",
            "Time of one HTTP attempt, body included",
            buckets=BUCKETS,
            registry=None,
        )
        self.in_flight = Gauge(
            "crawler_in_flight", "HTTP attempts under way", multiprocess_mode="livesum", registry=None
        )
        self.cache_hits = Counter("crawler_cache_hits_total", CACHE_HITS_HELP, ["kind"], registry=None)
        self.retries = Counter("crawler_retries_total", "Attempts that failed and were scheduled again", registry=None)
        self.written = Counter("crawler_results_written_total", "Results committed to the ledger", registry=None)
        self.write_lag = Histogram(
            "crawler_write_lag_seconds",
            "Time from a result handed to the writer to its commit",
            buckets=BUCKETS,
            registry=None,
        )

    def fetch_started(self) -> None:
        self.in_flight.inc()

    def fetch_ended(self) -> None:
        self.in_flight.dec()

    def attempted(self, attempt: Attempt) -> None:
        self._requests_of(attempt.status, attempt.error_kind).inc()
        self.duration.observe(attempt.elapsed_ms / 1000.0)

    def retried(self) -> None:
        self.retries.inc()

    def cache_hit(self, kind: str) -> None:
        self.cache_hits.labels(kind).inc()

    def results_written(self, handed_at: Iterable[float]) -> None:
        """Results just committed, given by the time.monotonic() at which each was handed over."""
        now = time.monotonic()
        count = 0
        for handed in handed_at:
            self.write_lag.observe(now - handed)
            count += 1
        self.written.inc(count)


class NoMetrics:
    """WorkerMetrics with metrics off: every hook returns at once (about 60 ns a call, measured).
    What is only gathered for a hook (a result's hand-over time) is skipped when not `counting`."""

    counting = False

    def fetch_started(self) -> None:
        pass

    def fetch_ended(self) -> None:
        pass

    def attempted(self, attempt: Attempt) -> None:
        pass

    def retried(self) -> None:
        pass

    def cache_hit(self, kind: str) -> None:
        pass

    def results_written(self, handed_at: Iterable[float]) -> None:
        pass  # a generator passed here is never run


def for_worker() -> WorkerMetrics | NoMetrics:
    """This process's metrics: counted when a parent serves them (it set PROMETHEUS_MULTIPROC_DIR
    before spawning us), else hooks that do nothing. One object per process, however often called."""
    return _metrics_in(os.environ.get(MULTIPROC_DIR))


@functools.cache
def _metrics_in(directory: str | None) -> WorkerMetrics | NoMetrics:
    if not directory:
        return NoMetrics()
    from prometheus_client import values

    # prometheus_client decides on file-backed values, and their directory, once: at its import.
    # A spawned worker imports it after the variable is set; a process that imported it earlier
    # and runs a worker in-process (a test, say) must decide again.
    values.ValueClass = values.MultiProcessValue()
    return WorkerMetrics()


class _Collector:
    """The workers' files summed, with what only the parent knows."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.restarts = 0
        self.chunks: dict[str, int] = {}
        self.duplicates: int | None = None  # known from the supervisor's poll of the job

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.multiprocess import MultiProcessCollector

        # Called on the HTTP server's thread; the fields above are only ever replaced whole.
        families = {family.name: family for family in MultiProcessCollector.merge(self._files())}
        if self.duplicates is not None:
            hits = families.setdefault(
                "crawler_cache_hits", CounterMetricFamily("crawler_cache_hits", CACHE_HITS_HELP, labels=["kind"])
            )
            hits.add_sample("crawler_cache_hits_total", {"kind": "duplicate"}, self.duplicates)
        families["crawler_worker_restarts"] = CounterMetricFamily(
            "crawler_worker_restarts", "Worker processes started again after one died", value=self.restarts
        )
        chunks = GaugeMetricFamily("crawler_chunks", "The job's chunks by state", labels=["state"])
        for state, count in self.chunks.items():
            chunks.add_metric([state], count)
        families["crawler_chunks"] = chunks
        return list(families.values())

    def _files(self):
        # A worker creates its file empty and sizes it next: read in between (or left so by a kill)
        # it would fail the whole scrape (prometheus/client_python#1199). A size never goes back.
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a live gauge's file, just marked dead
                if os.path.getsize(path):
                    yield path


class Exporter:
    """Serves the metrics of a parent and the worker processes it spawns, on http://HOST:PORT/metrics.

    The parent (the supervisor of `crawler crawl`/`resume`, or of `crawler worker --workers N`):

        exporter = Exporter.start(settings)  # BEFORE spawning any worker; None when metrics_port is 0
        exporter.observe_job(counts)         # on every poll, with job_counts
        exporter.worker_exited(pid)          # once for each worker process that has exited, any exit code
        exporter.worker_restarted()          # when a dead worker is replaced by a new process
        exporter.close()                     # after the last worker has exited (also: `with exporter:`)

    It puts PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory) into os.environ until close(),
    so that workers started in between count into it; close() stops the server and removes it.
    """

    def __init__(self, host: str, port: int) -> None:
        """Serve on host:port now (port 0: any free port, see .port)."""
        from prometheus_client import CollectorRegistry, start_http_server

        self.directory = tempfile.mkdtemp(prefix="crawler-metrics-")
        self._collector = _Collector(self.directory)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)
        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise UsageError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose another --metrics-port."
            ) from None
        self.port: int = self._server.server_port
        self._previous = os.environ.get(MULTIPROC_DIR)
        os.environ[MULTIPROC_DIR] = self.directory

    @classmethod
    def start(cls, settings: Settings) -> Exporter | None:
        return cls(settings.metrics_host, settings.metrics_port) if settings.metrics_port else None

    def observe_job(self, counts: JobCounts) -> None:
        """The job's chunks by state, and its duplicate rows: those are served from the cache by the
        ledger at the job's end (finish_job), never by a worker, so they are counted here,
        as cache_hits_total{kind="duplicate"}, as soon as ingest finds them."""
        self._collector.chunks = counts.chunks()
        self._collector.duplicates = counts.duplicates

    def worker_exited(self, pid: int) -> None:
        """Forget the process's live gauges (in flight); its counters stay in the sums."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.directory)

    def worker_restarted(self) -> None:
        self._collector.restarts += 1

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        if os.environ.get(MULTIPROC_DIR) == self.directory:
            if self._previous is None:
                del os.environ[MULTIPROC_DIR]
            else:
                os.environ[MULTIPROC_DIR] = self._previous
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
