"""A hostile web, produced on demand by the mock server: every misbehaviour ends in one stored
result with a stable error kind, the right number of attempts and a bounded cost."""

from __future__ import annotations

import asyncio
import ssl
import time
import tracemalloc

import aiohttp
import pytest
import trustme
from aiohttp import web

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.fetch.fetcher import Fetcher
from crawler.job.crawl import crawl
from crawler.mock.server import start_mock_server
from crawler.urls import request_url

HOSTILE = {
    "flaky-recovers": "/flaky/2/a",
    "flaky-gives-up": "/flaky/5/b",
    "not-found": "/status/404",
    "retry-after-too-long": "/retry-after/503/30/c",
    "retry-after-honoured": "/flaky-retry-after/1/1/d",
    "slow-headers": "/slow-headers/3000/e",
    "slow-body": "/slow-body/1500/3/f",
    "endless": "/endless/g",
    "huge-length": "/huge-length/h",
    "gzip-bomb": "/gzip-bomb/64",
    "redirect-loop": "/redirect-loop/i",
    "redirect-chain": "/redirect/3",
    "redirect-to-metadata": "/redirect-to?url=http://169.254.169.254/latest/meta-data/",
    "redirect-to-ftp": "/redirect-to?url=ftp://example.com/file",
    "reset": "/reset/j",
    "close": "/close/k",
    "garbage-status": "/garbage/l",
    "bad-headers": "/bad-headers/m",
    "short-body": "/short-body/n",
}


_CRAWLED: dict = {}


@pytest.fixture
async def hostile_results(session_dsn, db, mock_url, tmp_path):
    """One crawl of every misbehaviour (made once, then read by each test)."""
    if _CRAWLED:
        return _CRAWLED
    names = list(HOSTILE)
    path = tmp_path / "hostile.txt"
    path.write_text("".join(f"{mock_url}{HOSTILE[n]}\n" for n in names) + "http://127.0.0.1:1/refused\n")
    settings = test_settings(
        connect_timeout=1.0,
        read_timeout=0.5,
        total_timeout=5.0,
        max_attempts=3,
        backoff_base=0.05,
        backoff_max=0.1,
        retry_after_max=5.0,
        max_body_bytes=1024 * 1024,
        max_redirects=5,
        allow_net=["127.0.0.1/32"],
    )
    code = await crawl(
        session_dsn, settings, input_path=str(path), url_column=None, job_name="hostile", summary_json=None, quiet=True
    )
    assert code == EXIT_OK
    rows = await db.fetch(
        "SELECT r.row_no, r.status, r.final_url, r.error_kind, r.error, r.attempts, r.elapsed_ms, r.body_bytes"
        " FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = 'hostile' ORDER BY r.row_no"
    )
    _CRAWLED.update(zip(names + ["refused"], rows, strict=True))
    return _CRAWLED


EXPECTED = {
    # name: (status, error_kind, attempts)
    "flaky-recovers": (200, None, 3),
    "flaky-gives-up": (503, "http_status", 3),
    "not-found": (404, "http_status", 1),
    "retry-after-too-long": (503, "http_status", 1),
    "retry-after-honoured": (200, None, 2),
    "slow-headers": (None, "timeout", 3),
    "slow-body": (200, "timeout", 3),
    "endless": (200, "body_too_large", 1),
    "huge-length": (200, "body_too_large", 1),
    "gzip-bomb": (200, "body_too_large", 1),
    "redirect-loop": (None, "too_many_redirects", 1),
    "redirect-chain": (200, None, 1),
    "redirect-to-metadata": (None, "blocked", 1),
    "redirect-to-ftp": (None, "invalid_url", 1),
    "reset": (None, "reset", 3),
    "close": (None, "reset", 3),
    "garbage-status": (None, "protocol", 1),
    "bad-headers": (None, "protocol", 1),
    "short-body": (200, "protocol", 1),
    "refused": (None, "connect", 3),
}


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_each_misbehaviour_ends_in_one_classified_result(hostile_results, name):
    row = hostile_results[name]
    status, kind, attempts = EXPECTED[name]
    assert (row["status"], row["error_kind"], row["attempts"]) == (status, kind, attempts), row["error"]
    if kind is not None:
        assert row["error"] and "\n" not in row["error"]


async def test_details_of_the_hostile_results(hostile_results):
    r = hostile_results
    assert r["redirect-chain"]["final_url"].endswith("/redirect/0")
    assert "exceeds" in r["retry-after-too-long"]["error"] and "cap" in r["retry-after-too-long"]["error"]
    assert "169.254.169.254" in r["redirect-to-metadata"]["error"]
    # three attempts, each cut by the 0.5 s read timeout
    assert r["slow-headers"]["elapsed_ms"] >= 3 * 500
    # a 10 GiB Content-Length is body_too_large at once (EXPECTED), not a timeout; that it is
    # refused before a byte is read is test_a_small_declared_length_over_a_small_cap_is_refused's
    assert "1048576" in r["gzip-bomb"]["error"]


async def test_a_gzip_bomb_and_an_endless_body_cost_bounded_memory(mock_url):
    settings = test_settings(max_body_bytes=4 * 1024 * 1024, total_timeout=30.0)
    async with Fetcher(settings) as fetcher:
        tracemalloc.start()
        try:
            bomb = await fetcher.attempt("GET", f"{mock_url}/gzip-bomb/1024")  # 1 GiB of zeros
            endless = await fetcher.attempt("GET", f"{mock_url}/endless/x")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert bomb.error_kind == endless.error_kind == "body_too_large"
    assert peak < 32 * 1024 * 1024  # a few read buffers beyond the 4 MiB cap, not a gigabyte


async def test_the_total_timeout_cuts_a_body_that_never_pauses_long(mock_url):
    # One byte every 100 ms for 10 s: never silent for the read timeout, always over the total.
    settings = test_settings(read_timeout=1.0, total_timeout=0.6)
    async with Fetcher(settings) as fetcher:
        attempt = await fetcher.attempt("GET", f"{mock_url}/slow-body/100/100/x")
    assert (attempt.status, attempt.error_kind) == (200, "timeout")
    assert "total timeout (0.6s)" in attempt.error
    assert attempt.elapsed_ms >= 600  # the error names which timeout fired; no upper bound on a busy machine


async def test_the_read_timeout_counts_from_the_last_read(mock_url):
    settings = test_settings(read_timeout=0.4, total_timeout=10.0)
    async with Fetcher(settings) as fetcher:
        # Five bytes 150 ms apart: 750 ms in all, each wait shorter than the read timeout.
        steady = await fetcher.attempt("GET", f"{mock_url}/slow-body/150/5/x")
        # Silent for 1.5 s before the first byte of the body.
        stalled = await fetcher.attempt("GET", f"{mock_url}/slow-body/1500/2/x")
        # Silent for 1.5 s before the status line.
        no_headers = await fetcher.attempt("GET", f"{mock_url}/slow-headers/1500/x")
    assert (steady.status, steady.error_kind, steady.body_bytes) == (200, None, 5)
    assert (stalled.status, stalled.error_kind) == (200, "timeout")
    assert (no_headers.status, no_headers.error_kind) == (None, "timeout")
    assert "read timeout (0.4s)" in stalled.error and "read timeout (0.4s)" in no_headers.error
    assert stalled.elapsed_ms >= 400 and no_headers.elapsed_ms >= 400


async def in_flight_at(base: str, count: int, timeout: float = 10) -> None:
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(timeout):
            while (await (await session.get(f"{base}/__stats")).json())["in_flight"] < count:
                await asyncio.sleep(0.01)


async def test_a_timeout_leaves_the_task_fetching_and_other_cancellations_go_through(mock_url):
    settings = test_settings(read_timeout=0.2, total_timeout=10.0)
    async with Fetcher(settings) as fetcher:
        timed_out = await fetcher.attempt("GET", f"{mock_url}/slow-headers/2000/x")
        after = await fetcher.attempt("GET", f"{mock_url}/ok/x")  # the same task, not left cancelled
        assert asyncio.current_task().cancelling() == 0
        stopped = asyncio.create_task(fetcher.attempt("GET", f"{mock_url}/slow-headers/2000/y"))
        await in_flight_at(mock_url, 1)  # the request has reached the server
        stopped.cancel()  # e.g. a drain past its grace period: not a timeout, not swallowed
        with pytest.raises(asyncio.CancelledError):
            await stopped
    assert timed_out.error_kind == "timeout" and (after.status, after.error_kind) == (200, None)


async def test_a_body_is_hashed_and_stored_only_when_asked(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "bodies.txt"
    path.write_text(f"{mock_url}/bytes/3000\n")
    settings = test_settings(store_bodies=True)
    assert (
        await crawl(
            session_dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name="bodies",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    row = await db.fetchrow(
        "SELECT b.body, b.encoding, r.body_bytes FROM bodies b JOIN results r USING (job_id, row_no)"
        " JOIN jobs j ON j.id = b.job_id WHERE j.name = 'bodies'"
    )
    import zlib

    assert row["encoding"] == "zlib" and row["body_bytes"] == 3000
    assert zlib.decompress(row["body"]) == bytes(i % 256 for i in range(3000))


async def test_method_headers_and_body_come_from_csv_columns(session_dsn, db, aiohttp_server, tmp_path):
    seen = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("X-Test"), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    path = tmp_path / "methods.csv"
    path.write_text(
        "url,method,headers,body\n"
        f'{base}/a,POST,"{{""X-Test"": ""yes""}}",hello\n'
        f"{base}/b,,,\n"
        f"{base}/c,BAD METHOD,,\n"
        f'{base}/d,PUT,"{{not json",x\n'
    )
    assert (
        await crawl(
            session_dsn,
            test_settings(),
            input_path=str(path),
            url_column=None,
            job_name="methods",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    assert sorted(seen) == [("GET", None, b""), ("POST", "yes", b"hello")]
    invalid = await db.fetch(
        "SELECT i.row_no, i.reason FROM invalid_rows i JOIN jobs j ON j.id = i.job_id WHERE j.name = 'methods'"
        " ORDER BY i.row_no"
    )
    assert [r["row_no"] for r in invalid] == [3, 4]
    assert "method" in invalid[0]["reason"] and "JSON" in invalid[1]["reason"]


@pytest.fixture
async def tls_server(aiohttp_server):
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    server = await aiohttp_server(app, ssl=context)
    return f"https://127.0.0.1:{server.port}/page"


async def test_an_untrusted_certificate_is_tls_unless_insecure(tls_server):
    async with Fetcher(test_settings()) as fetcher:
        strict = await fetcher.attempt("GET", tls_server)
    async with Fetcher(test_settings(insecure=True)) as fetcher:
        relaxed = await fetcher.attempt("GET", tls_server)
    assert strict.error_kind == "tls" and "certificate" in strict.error.lower()
    assert (relaxed.status, relaxed.error_kind) == (200, None)


async def stats(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/__stats") as resp:
            return await resp.json()


async def test_the_per_host_limit_holds_across_workers(session_dsn, mock_url, tmp_path):
    path = tmp_path / "one-host.txt"
    path.write_text("".join(f"{mock_url}/delay/50/{i}\n" for i in range(120)))
    settings = test_settings(workers=2, concurrency=30, per_host_concurrency=4, adaptive_concurrency=False)
    assert (
        await crawl(
            session_dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name="per-host",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    seen = await stats(mock_url)
    assert 2 <= seen["max_in_flight"] <= 4  # 4 for the host in all, 2 per worker


async def test_a_slow_host_does_not_take_the_whole_pool(session_dsn, db, tmp_path):
    slow_runner, slow = await start_mock_server(host="127.0.0.1")
    fast_runner, fast = await start_mock_server(host="127.0.0.2")
    try:
        path = tmp_path / "two-hosts.txt"
        lines = []
        for i in range(40):
            lines += [f"{slow}/delay/1000/{i}"] if i < 12 else []
            lines += [f"{fast}/ok/{i}"]
        path.write_text("\n".join(lines) + "\n")
        settings = test_settings(
            workers=1, concurrency=10, per_host_concurrency=2, adaptive_concurrency=False, chunk_size=100
        )
        assert (
            await crawl(
                session_dsn,
                settings,
                input_path=str(path),
                url_column=None,
                job_name="slow-host",
                summary_json=None,
                quiet=True,
            )
            == EXIT_OK
        )
        rows = await db.fetch(
            "SELECT q.url, r.fetched_at FROM results r JOIN requests q USING (job_id, row_no)"
            " JOIN jobs j ON j.id = r.job_id WHERE j.name = 'slow-host'"
        )
    finally:
        await slow_runner.cleanup()
        await fast_runner.cleanup()
    fast_done = max(r["fetched_at"] for r in rows if r["url"].startswith(fast))
    slow_done = sorted(r["fetched_at"] for r in rows if r["url"].startswith(slow))
    # the fast host finished while the slow one (2 at a time, 1 s each) had most of its work left
    assert sum(1 for t in slow_done if t <= fast_done) <= 6


async def test_a_per_host_rate_limit_spaces_requests(session_dsn, aiohttp_server, tmp_path):
    arrivals: list[float] = []

    async def handle(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())  # seen by the server, not by the crawl's clock
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    path = tmp_path / "rate.txt"
    path.write_text("".join(f"http://127.0.0.1:{server.port}/ok/{i}\n" for i in range(30)))
    settings = test_settings(workers=1, per_host_rate=20.0)
    assert (
        await crawl(
            session_dsn, settings, input_path=str(path), url_column=None, job_name="rate", summary_json=None, quiet=True
        )
        == EXIT_OK
    )
    assert len(arrivals) == 30
    # 29 gaps of 1/20 s between starts. Single gaps vary with delivery (a new connection, a busy
    # loop), so the span is what is checked: a delivery's jitter may shift the first or last a little.
    assert arrivals[-1] - arrivals[0] >= 29 / 20 - 0.05


@pytest.mark.parametrize("size", [0, 3000, 64 * 1024, 64 * 1024 + 1, 300_000])
async def test_a_body_of_any_size_is_counted_hashed_and_kept_whole(mock_url, size):
    """Bodies of one read block (64 KiB), of more, and of none."""
    import hashlib

    expected = (bytes(range(256)) * (size // 256 + 1))[:size]
    async with Fetcher(test_settings(store_bodies=True, max_body_bytes=1 << 20)) as fetcher:
        kept = await fetcher.attempt("GET", f"{mock_url}/bytes/{size}")
    async with Fetcher(test_settings(max_body_bytes=1 << 20)) as fetcher:
        hashed = await fetcher.attempt("GET", f"{mock_url}/bytes/{size}")
        head = await fetcher.attempt("HEAD", f"{mock_url}/bytes/{size}")
    assert (kept.status, kept.error_kind, kept.body_bytes) == (200, None, size)
    assert kept.body == ("application/octet-stream", expected)
    assert kept.body_sha256 == hashed.body_sha256 == hashlib.sha256(expected).digest()
    assert hashed.body is None
    assert (head.status, head.body_bytes) == (200, 0)


async def test_a_small_declared_length_over_a_small_cap_is_refused(mock_url):
    async with Fetcher(test_settings(max_body_bytes=1000)) as fetcher:
        over = await fetcher.attempt("GET", f"{mock_url}/bytes/1001")
        at = await fetcher.attempt("GET", f"{mock_url}/bytes/1000")
    assert (over.status, over.error_kind) == (200, "body_too_large")
    assert (at.error_kind, at.body_bytes) == (None, 1000)


async def test_the_url_to_send_goes_out_as_written(aiohttp_server):
    """encoded=True (the worker's URLs, as crawler.urls.parse_url makes them at ingest) skips
    yarl's requoting, which would decode the reserved escape %2F in the query: the request line
    and the final URL are the URL as stored."""
    paths = []

    async def echo(request: web.Request) -> web.Response:
        paths.append(request.raw_path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    server = await aiohttp_server(app)
    url = request_url(f"http://127.0.0.1:{server.port}/caf\u00e9/a b/%7e/%2f?q=1+2&r=%2F&s=\u00e9")
    async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
        encoded = await fetcher.attempt("GET", url, encoded=True)
    assert (encoded.status, encoded.final_url) == (200, url)
    assert paths == [url.split(str(server.port), 1)[1]] == ["/caf%C3%A9/a%20b/%7e/%2f?q=1+2&r=%2F&s=%C3%A9"]
