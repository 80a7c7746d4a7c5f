"""The waits the crawler promises, measured where they happen: a connect timeout against an
address that takes no connection (a loopback listener whose backlog is full), a Retry-After
that holds the request and its whole host back, and the backoff of a retry without one, seen in
the server's own request times."""

from __future__ import annotations

import random
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.fetch.fetcher import Fetcher
from crawler.fetch.retry import RetryPolicy, backoff
from crawler.job.crawl import crawl

pytestmark = pytest.mark.one_server


@pytest.fixture
def silent_address():
    """host:port on 127.0.0.1 where a SYN is never answered: a listener that never accepts, its
    one-place backlog filled first (Linux then drops further SYNs instead of refusing them)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(16):  # until a connect neither succeeds nor is refused
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(address)
            except TimeoutError:
                probe.close()
                break
            fillers.append(probe)
        else:
            pytest.fail("the loopback listener kept accepting connections into its backlog")
        yield f"{address[0]}:{address[1]}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_a_connect_that_is_never_answered_ends_at_the_connect_timeout(silent_address):
    settings = test_settings(connect_timeout=0.5, read_timeout=60.0, total_timeout=60.0)
    async with Fetcher(settings) as fetcher:
        attempt = await fetcher.attempt("GET", f"http://{silent_address}/never")
    assert attempt.error_kind == "timeout"
    assert "Connection timeout" in attempt.error, attempt.error  # the connect timeout, not the total
    assert attempt.elapsed_ms >= 500
    assert attempt.status is None


async def test_a_silent_address_is_a_timeout_result_retried_to_the_last_attempt(
    session_dsn, db, silent_address, tmp_path
):
    path = tmp_path / "silent.txt"
    path.write_text(f"http://{silent_address}/never\n")
    settings = test_settings(connect_timeout=0.3, max_attempts=2, workers=1)
    assert (
        await crawl(
            session_dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name="silent-address",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    row = await db.fetchrow(
        "SELECT r.error_kind, r.error, r.attempts, r.elapsed_ms FROM results r"
        " JOIN jobs j ON j.id = r.job_id WHERE j.name = 'silent-address'"
    )
    assert (row["error_kind"], row["attempts"]) == ("timeout", 2)
    assert "Connection timeout" in row["error"] and row["elapsed_ms"] >= 2 * 300


@pytest.fixture
async def paused_host(aiohttp_server):
    """A server whose /busy answers 503 with Retry-After: 1 the first time and 200 after; every
    other path answers 200. It records when each request arrived and when the 503 left."""
    log: list[tuple[str, float]] = []
    sent: dict[str, float] = {}

    async def handle(request: web.Request) -> web.Response:
        log.append((request.path, time.monotonic()))
        if request.path == "/busy" and "503" not in sent:
            sent["503"] = time.monotonic()
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", log, sent


async def test_a_retry_after_holds_the_request_and_its_host_for_the_time_asked(session_dsn, paused_host, tmp_path):
    base, log, sent = paused_host
    path = tmp_path / "paused.txt"
    path.write_text(f"{base}/busy\n" + "".join(f"{base}/other/{i}\n" for i in range(10)))
    # One request at a time to the host: whatever reaches it after the 503 was sent after it.
    settings = test_settings(workers=1, per_host_concurrency=1, adaptive_concurrency=False, max_attempts=3)
    assert (
        await crawl(
            session_dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name="retry-after-waits",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    answered = sent["503"]
    retried = [t for p, t in log if p == "/busy"][1]
    assert retried - answered >= 1.0  # the retry waited the second the server asked for
    during = [p for p, t in log if answered < t < answered + 1.0]
    assert during == []  # and nothing else went to the paused host meanwhile
    assert sorted(p for p, _ in log) == sorted(["/busy", "/busy"] + [f"/other/{i}" for i in range(10)])


BACKOFF_SEED = 2  # its first two draws are over two thirds of their ceilings: waits that show


# aiohttp sends an idempotent request a second time, at once, after a reset (one attempt of the
# crawler's, two requests: tests/test_mock_behaviours.py), so a reset row's attempt is two arrivals.
@pytest.mark.parametrize(("failure", "sends"), [("flaky", 1), ("flaky-reset", 2)])
async def test_a_retry_without_retry_after_waits_the_backoff_the_policy_drew(
    session_dsn, db, mock_url, monkeypatch, tmp_path, failure, sends
):
    """A 503 without Retry-After, or a reset, on two attempts, then an answer: each retry reaches
    the server no sooner than the delay drawn for it (full jitter, from a seed the worker is given,
    so the delays are known here) after the failed attempt reached it."""
    monkeypatch.setenv("CRAWLER_TEST_RETRY_SEED", str(BACKOFF_SEED))
    policy = RetryPolicy(max_attempts=3, backoff_base=0.3, backoff_max=10.0)
    rng = random.Random(BACKOFF_SEED)
    delays = [backoff(1, policy, rng), backoff(2, policy, rng)]
    assert min(delays) > 0.2  # else a retry sent at once could pass for one that waited
    target = f"/{failure}/{2 * sends}/backoff"  # fails the first two attempts, answers the third
    path = tmp_path / "backoff.txt"
    path.write_text(f"{mock_url}{target}\n")  # one row: its retries are the only draws
    settings = test_settings(
        workers=1, max_attempts=policy.max_attempts, backoff_base=policy.backoff_base, backoff_max=policy.backoff_max
    )
    assert (
        await crawl(
            session_dsn,
            settings,
            input_path=str(path),
            url_column=None,
            job_name=f"backoff-waits-{failure}",
            summary_json=None,
            quiet=True,
        )
        == EXIT_OK
    )
    async with aiohttp.ClientSession() as session, session.get(f"{mock_url}/__arrivals") as resp:
        arrivals = [when for when, arrived in (await resp.json())["arrivals"] if arrived == target]
    assert len(arrivals) == 2 * sends + 1  # two failed attempts and the answer
    failed_last = [arrivals[sends - 1], arrivals[2 * sends - 1]]  # the last request of each failed attempt
    retried = [arrivals[sends], arrivals[2 * sends]]  # the first of the next attempt
    waited = [later - earlier for earlier, later in zip(failed_last, retried, strict=True)]
    assert waited[0] >= delays[0] and waited[1] >= delays[1], (waited, delays)
    row = await db.fetchrow(
        "SELECT r.status, r.attempts FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1",
        f"backoff-waits-{failure}",
    )
    assert (row["status"], row["attempts"]) == (200, 3)
