"""`crawler bench` end to end as a real process: its summary adds up and carries the bench figures.
No timing is asserted: the figures only have to be there and positive."""

from __future__ import annotations

import orjson
import pytest

from conftest import run_cli
from crawler.mock.bench import duplicate_rows, write_urls

pytestmark = pytest.mark.one_server


def _bench(tmp_path, session_dsn, *extra: str) -> dict:
    path = tmp_path / "summary.json"
    done = run_cli(
        "bench",
        "--urls",
        "2000",
        "--workers",
        "2",
        "--concurrency",
        "20",
        "--dsn",
        session_dsn,
        "--summary-json",
        str(path),
        "--quiet",
        *extra,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"", "--quiet prints nothing"
    return orjson.loads(path.read_bytes())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_bench_summary_adds_up_and_has_its_figures(tmp_path, session_dsn):
    summary = _bench(tmp_path, session_dsn)
    assert summary["state"] == "done"
    assert summary["rows"] == 2000
    assert summary["rows"] == summary["fetched"] + summary["from_cache"] + summary["invalid"]
    assert summary["fetched"] == 2000 and summary["ok"] == 2000
    bench = summary["bench"]
    for key in (
        "requests_per_s",
        "fetch_rate_per_s",
        "cpu_s_per_1000_requests",
        "rows_written_per_s",
        "time_to_first_request_s",
    ):
        assert _positive(bench[key]), key
    assert all(_positive(bench["latency_ms"][p]) for p in ("p50", "p95", "p99"))
    assert bench["latency_ms"]["p50"] <= bench["latency_ms"]["p95"] <= bench["latency_ms"]["p99"]
    assert _positive(bench["peak_rss_bytes"]["supervisor"])
    assert len(bench["peak_rss_bytes"]["workers"]) >= 2
    assert all(_positive(n) for n in bench["peak_rss_bytes"]["workers"])
    assert _positive(bench["cpu_s"]["workers"]) and bench["cpu_s"]["supervisor"] >= 0
    assert sum(w["fetched"] for w in bench["workers"]) == summary["fetched"]


def test_bench_duplicates_are_served_from_the_cache(tmp_path, session_dsn):
    summary = _bench(tmp_path, session_dsn, "--duplicates", "0.3")
    assert duplicate_rows(2000, 0.3) == 600
    assert summary["rows"] == 2000
    assert summary["from_cache"] == 600
    assert summary["fetched"] == 1400
    assert summary["rows"] == summary["fetched"] + summary["from_cache"] + summary["invalid"]
    assert summary["bench"]["rows_written_per_s"] > 0


def test_generated_duplicates_are_exact_spread_and_earlier(tmp_path):
    path = tmp_path / "urls.csv"
    write_urls(path, "http://127.0.0.1:1", 1000, 0.25, 0)
    urls = path.read_text().splitlines()[1:]
    assert len(urls) == 1000
    seen: set[str] = set()
    repeats = []
    for i, url in enumerate(urls):
        if url in seen:
            repeats.append(i)
        seen.add(url)
    assert len(repeats) == duplicate_rows(1000, 0.25) == 250
    assert repeats[0] < 10 and repeats[-1] > 990  # spread through the file, not bunched at its end
    assert write_urls(tmp_path / "again.csv", "http://127.0.0.1:1", 1000, 0.25, 0) is None
    assert (tmp_path / "again.csv").read_text() == path.read_text()
