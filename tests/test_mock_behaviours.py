"""Each path of the mock server answers, or misbehaves, the way a client would see it.

Only 127.0.0.1 is ever contacted: redirects to other places are checked without being followed.
"""

import asyncio
import errno
import gzip
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from crawler.mock.behaviours import (
    CACHE_CONTROL,
    CHUNK_SIZE,
    HUGE_LENGTH,
    MAX_BYTES,
    MAX_RANDOM_LATENCY_MS,
    random_outcome,
)
from crawler.mock.server import create_app

pytestmark = pytest.mark.one_server

TIMEOUT = aiohttp.ClientTimeout(total=20)
MIB = 1 << 20


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(), timeout=TIMEOUT)


@pytest.fixture
def server_errors(caplog):
    """The aiohttp server's error log: a misbehaviour on purpose must leave it empty."""
    caplog.set_level(logging.ERROR, logger="aiohttp")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def expected_bytes(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


async def stats(client) -> dict:
    async with client.get("/__stats") as resp:
        return await resp.json()


async def wait_until_idle(client, within_s: float = 3.0) -> dict:
    """/__stats once no handler is left running, or after `within_s` (the caller then fails)."""
    deadline = time.monotonic() + within_s
    for _ in range(1000):
        current = await stats(client)
        if current["in_flight"] == 0 or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.01)
    return current


async def raw_exchange(client, path: str, method: str = "GET", limit: int = 1 << 16) -> bytes:
    """Send one request over a plain socket; everything the server sends until it closes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(client.server.host, client.server.port), 5)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(limit), 5)
    finally:
        writer.close()


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
        body += chunk
        if len(body) >= cap:
            break
    return bytes(body)


# --- plain answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/ok", "/ok/", "/ok/a/b/c.html"])
async def test_ok_answers_200_plain_text(client, method, path):
    resp = await client.request(method, path, data=b"ignored" if method == "POST" else None)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "ok\n"


async def test_ok_head_has_no_body(client):
    resp = await client.head("/ok/x")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_unknown_path_is_404(client):
    for path in ["/okay", "/nothing/here", "/endlessly", "/reset-all", "/flaky"]:
        assert (await client.get(path)).status == 404, path


@pytest.mark.parametrize("code", [200, 201, 301, 302, 400, 404, 418, 429, 500, 503, 599])
async def test_status_returns_the_code_asked_for(client, code):
    resp = await client.get(f"/status/{code}", allow_redirects=False)
    assert resp.status == code
    assert await resp.text() == f"{code}\n"


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body_codes_send_no_body(client, code):
    resp = await client.get(f"/status/{code}")
    assert resp.status == code
    assert await resp.read() == b""


@pytest.mark.parametrize("path", ["/status/99", "/status/600", "/status/-1", "/status/abc"])
async def test_status_rejects_bad_codes_with_400(client, path):
    resp = await client.get(path)
    assert resp.status == 400


@pytest.mark.parametrize("prefix", ["/delay", "/capacity-delay"])
async def test_delay_waits_at_least_the_time_asked_for(client, prefix):
    started = time.monotonic()
    resp = await client.get(f"{prefix}/300/some/page")
    assert resp.status == 200
    assert await resp.text() == "ok\n"
    assert time.monotonic() - started >= 0.3


async def test_delay_without_a_tail_and_of_zero_answers_at_once(client):
    assert (await client.get("/delay/0")).status == 200


@pytest.mark.parametrize("path", ["/delay/abc/x", "/delay/-5/x", "/delay/60001/x"])
async def test_delay_rejects_bad_durations_with_400(client, path):
    assert (await client.get(path)).status == 400


@pytest.mark.parametrize("n", [0, 1, 255, 256, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 300_000])
async def test_bytes_returns_exactly_n_deterministic_bytes(client, n):
    resp = await client.get(f"/bytes/{n}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(n)
    assert "Transfer-Encoding" not in resp.headers
    body = await resp.read()
    assert body == expected_bytes(n)


async def test_bytes_large_body_streams_the_exact_length(client):
    n = 64 * MIB + 7
    resp = await client.get(f"/bytes/{n}")
    assert resp.headers["Content-Length"] == str(n)
    received = 0
    tail = b""
    async for chunk in resp.content.iter_chunked(MIB):
        received += len(chunk)
        tail = (tail + chunk)[-256:]
    assert received == n
    assert tail == bytes((n - 256 + i) % 256 for i in range(256))


async def test_bytes_head_sends_length_but_no_body(client):
    resp = await client.head("/bytes/100000")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "100000"
    assert await resp.read() == b""


@pytest.mark.parametrize("path", [f"/bytes/{MAX_BYTES + 1}", "/bytes/-1", "/bytes/ten"])
async def test_bytes_rejects_bad_sizes_with_400(client, path):
    assert (await client.get(path)).status == 400


async def test_bytes_client_leaving_early_ends_the_handler_quietly(client, server_errors):
    async with client.get(f"/bytes/{MAX_BYTES}") as resp:
        assert len(await read_capped(resp, MIB)) >= MIB
        resp.close()
    assert (await wait_until_idle(client))["in_flight"] == 0
    assert server_errors() == []


@pytest.mark.parametrize("n", [0, 1, 5])
async def test_redirect_chain_ends_in_200_after_n_hops(client, n):
    resp = await client.get(f"/redirect/{n}")
    assert resp.status == 200
    assert len(resp.history) == n
    assert all(hop.status == 302 for hop in resp.history)
    assert resp.url.path == "/redirect/0"


async def test_redirect_points_to_the_next_hop(client):
    resp = await client.get("/redirect/3", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/redirect/2"


@pytest.mark.parametrize("path", ["/redirect/-1", "/redirect/x"])
async def test_redirect_rejects_bad_counts_with_400(client, path):
    assert (await client.get(path)).status == 400


# --- slow servers ----------------------------------------------------------------------------


async def test_slow_headers_trip_a_read_timeout_before_the_status_line(client):
    with pytest.raises(aiohttp.ServerTimeoutError):  # 0.1 s of silence, long before the 1 s status line
        await client.get("/slow-headers/1000/a", timeout=aiohttp.ClientTimeout(sock_read=0.1))


async def test_slow_headers_answer_200_after_the_wait(client):
    started = time.monotonic()
    resp = await client.get("/slow-headers/200", timeout=aiohttp.ClientTimeout(sock_read=2))
    assert resp.status == 200
    assert time.monotonic() - started >= 0.2


async def test_slow_body_sends_headers_at_once_then_stalls_between_bytes(client):
    # The headers did not wait: with 0.1 s allowed between reads, a status line held back for the
    # first 0.5 s gap would have been a timeout here.
    resp = await client.get("/slow-body/500/3/a", timeout=aiohttp.ClientTimeout(sock_read=0.1))
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "3"
    with pytest.raises(aiohttp.ServerTimeoutError):
        await resp.read()
    resp.close()
    # The handler notices at its next write, 0.5 s after its last one.
    assert (await wait_until_idle(client))["in_flight"] == 0


async def test_slow_body_delivers_n_bytes_with_the_gaps(client):
    started = time.monotonic()
    resp = await client.get("/slow-body/50/4", timeout=aiohttp.ClientTimeout(sock_read=1))
    assert await resp.read() == b"...."
    assert time.monotonic() - started >= 0.2


# --- bodies that never end -------------------------------------------------------------------


async def test_endless_body_streams_until_the_client_leaves(client, server_errors):
    async with client.get("/endless/a") as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        assert len(await read_capped(resp, MIB)) >= MIB
        assert (await stats(client))["in_flight"] == 1
        resp.close()
    assert (await wait_until_idle(client))["in_flight"] == 0
    assert server_errors() == []


async def test_huge_length_claims_10_gib_and_streams_until_the_client_leaves(client, server_errors):
    async with client.get("/huge-length/a") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(HUGE_LENGTH) == "10737418240"
        body = await read_capped(resp, MIB)
        assert body[:MIB] == expected_bytes(256) * (MIB // 256)
        resp.close()
    assert (await wait_until_idle(client))["in_flight"] == 0
    assert server_errors() == []


@pytest.mark.parametrize("path", ["/endless", "/huge-length", "/gzip-bomb/1024"])
async def test_never_ending_bodies_send_only_headers_to_head(client, path):
    resp = await client.head(path)
    assert resp.status == 200
    assert await resp.read() == b""


async def test_gzip_bomb_is_small_on_the_wire_and_huge_decompressed(client, server_errors):
    async with client.get("/gzip-bomb/1024") as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert int(resp.headers["Content-Length"]) < 1.1 * MIB  # for 1 GiB of zeros
        body = await read_capped(resp, 16 * MIB)  # aiohttp decompresses as it reads
        assert len(body) >= 16 * MIB
        assert body.count(0) == len(body)
        resp.close()
    assert (await wait_until_idle(client))["in_flight"] == 0
    assert server_errors() == []


@pytest.mark.parametrize("mib", [0, 1, 16, 70])
async def test_gzip_bomb_is_one_valid_gzip_member_of_mib_zeros(client, mib):
    resp = await client.get(f"/gzip-bomb/{mib}", auto_decompress=False)
    raw = await resp.read()
    assert len(raw) == int(resp.headers["Content-Length"]) < 1100 * mib + 100
    assert gzip.decompress(raw) == bytes(mib * MIB)  # checks the CRC and the size too


async def test_gzip_bomb_decompresses_fully_through_aiohttp(client):
    assert await (await client.get("/gzip-bomb/16")).read() == bytes(16 * MIB)


@pytest.mark.parametrize("path", ["/gzip-bomb/-1", "/gzip-bomb/10241", "/gzip-bomb/x"])
async def test_gzip_bomb_rejects_bad_sizes_with_400(client, path):
    assert (await client.get(path)).status == 400


# --- redirects -------------------------------------------------------------------------------


async def test_redirect_loop_points_to_itself_until_too_many_redirects(client):
    resp = await client.get("/redirect-loop/b?q=1", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/redirect-loop/b?q=1"
    with pytest.raises(aiohttp.TooManyRedirects) as caught:
        await client.get("/redirect-loop/a", max_redirects=5)
    assert len(caught.value.history) == 5
    assert {hop.url.path for hop in caught.value.history} == {"/redirect-loop/a"}
    assert (await stats(client))["hits"]["paths"]["/redirect-loop/a"] == 5


async def test_redirect_cycle_goes_round_n_urls(client):
    resp = await client.get("/redirect-cycle/3/2/x", allow_redirects=False)
    assert resp.headers["Location"] == "/redirect-cycle/3/0/x"
    with pytest.raises(aiohttp.TooManyRedirects) as caught:
        await client.get("/redirect-cycle/2/0", max_redirects=4)
    paths = [hop.url.path for hop in caught.value.history]
    assert paths == ["/redirect-cycle/2/0", "/redirect-cycle/2/1"] * 2


@pytest.mark.parametrize("path", ["/redirect-cycle/0/0", "/redirect-cycle/2/2", "/redirect-cycle/2/-1"])
async def test_redirect_cycle_rejects_bad_positions_with_400(client, path):
    assert (await client.get(path)).status == 400


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1:8080/a?b=c",
        "http://[::1]:1/",
        "ftp://example.com/file",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "/ok/relative",
    ],
)
async def test_redirect_to_sends_any_location_verbatim_and_fetches_nothing(client, url):
    resp = await client.get("/redirect-to", params={"url": url}, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == url
    assert (await stats(client))["hits"]["total"] == 1  # the server made no request of its own


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_to_uses_the_status_asked_for(client, status):
    resp = await client.get("/redirect-to", params={"url": "/ok", "status": str(status)}, allow_redirects=False)
    assert resp.status == status


async def test_redirect_to_another_scheme_is_refused_by_aiohttp(client):
    with pytest.raises(aiohttp.NonHttpUrlRedirectClientError):
        await client.get("/redirect-to", params={"url": "file:///etc/passwd"})


@pytest.mark.parametrize("params", [{}, {"url": ""}, {"url": "/ok\r\nX: y"}, {"url": "/ok", "status": "200"}])
async def test_redirect_to_rejects_bad_queries_with_400(client, params):
    assert (await client.get("/redirect-to", params=params, allow_redirects=False)).status == 400


# --- broken connections and broken HTTP ------------------------------------------------------


async def test_reset_is_seen_as_econnreset(client, server_errors):
    # POST: aiohttp retries an idempotent request once after a reset, which would hide the count.
    with pytest.raises(aiohttp.ClientOSError) as caught:
        await client.post("/reset/a")
    assert caught.value.errno == errno.ECONNRESET
    assert (await stats(client))["hits"]["paths"]["/reset/a"] == 1
    assert server_errors() == []


@pytest.mark.parametrize(
    ("path", "error"),
    [("/reset/b", aiohttp.ClientOSError), ("/close/b", aiohttp.ServerDisconnectedError)],
)
async def test_a_real_session_retries_a_get_once_after_a_reset_or_close(client, path, error):
    # aiohttp's own test client turns this retry off; a plain ClientSession, like the crawler's,
    # sends every idempotent request a second time after ClientOSError or ServerDisconnectedError.
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        with pytest.raises(error):
            await session.get(client.make_url(path))
        with pytest.raises(error):
            await session.post(client.make_url(path))
    assert (await stats(client))["hits"]["paths"][path] == 3


async def test_reset_sends_rst_on_a_plain_socket(client):
    with pytest.raises(ConnectionResetError):
        await raw_exchange(client, "/reset")


async def test_close_is_seen_as_server_disconnected(client, server_errors):
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/close/a")
    assert await raw_exchange(client, "/close") == b""  # a clean EOF, no RST
    assert server_errors() == []


async def test_garbage_status_line_is_a_response_error(client, server_errors):
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await client.get("/garbage/a")
    assert "status line" in caught.value.message.lower()
    assert await raw_exchange(client, "/garbage") == b"HTTP/1.1 abc\r\n\r\n"
    assert server_errors() == []


async def test_garbage_bytes_are_n_random_bytes_the_same_for_the_same_seed(aiohttp_client):
    seed_1, again, seed_2 = [await aiohttp_client(create_app(seed=seed), timeout=TIMEOUT) for seed in (1, 1, 2)]
    with pytest.raises(aiohttp.ClientResponseError):
        await seed_1.get("/garbage-bytes/64/a")
    first = await raw_exchange(seed_1, "/garbage-bytes/300/a")
    assert len(first) == 300
    assert await raw_exchange(again, "/garbage-bytes/300/a") == first
    assert await raw_exchange(seed_1, "/garbage-bytes/300/b") != first
    assert await raw_exchange(seed_2, "/garbage-bytes/300/a") != first


async def test_bad_headers_are_a_response_error(client):
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await client.get("/bad-headers/a")
    assert "header" in caught.value.message.lower()
    assert (await raw_exchange(client, "/bad-headers")).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_short_body_is_a_payload_error_after_good_headers(client):
    resp = await client.get("/short-body/a")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "100"
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert (await raw_exchange(client, "/short-body")).endswith(b"\r\n\r\n0123456789")


# --- flaky servers and Retry-After -----------------------------------------------------------


async def test_flaky_fails_exactly_n_times_per_path_then_recovers(client):
    assert [(await client.get("/flaky/3/a")).status for _ in range(5)] == [503] * 3 + [200] * 2
    assert (await client.get("/flaky/3/b")).status == 503  # another path, its own count
    assert (await client.get("/flaky/0/a")).status == 200


async def test_flaky_fails_again_after_the_hits_are_reset(client):
    assert [(await client.get("/flaky/1")).status for _ in range(2)] == [503, 200]
    await client.post("/__hits/reset")
    assert [(await client.get("/flaky/1")).status for _ in range(2)] == [503, 200]


async def test_flaky_reset_resets_exactly_n_times_then_recovers(client):
    for _ in range(2):
        with pytest.raises(aiohttp.ClientOSError) as caught:
            await client.post("/flaky-reset/2/a")
        assert caught.value.errno == errno.ECONNRESET
    assert (await client.post("/flaky-reset/2/a")).status == 200


async def test_flaky_retry_after_sends_429_with_retry_after_n_times(client):
    for _ in range(2):
        resp = await client.get("/flaky-retry-after/2/7/a")
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
    resp = await client.get("/flaky-retry-after/2/7/a")
    assert resp.status == 200
    assert "Retry-After" not in resp.headers


async def test_hit_answers_with_its_paths_hit_count_so_each_answer_names_its_request(aiohttp_client):
    client = await aiohttp_client(create_app(count_paths=False), timeout=TIMEOUT)  # counted all the same
    assert [await (await client.get("/hit/0/a")).text() for _ in range(3)] == ["1\n", "2\n", "3\n"]
    assert await (await client.get("/hit/0/b")).text() == "1\n"  # another path, its own count
    # Answers that overlap name the request each answers, not the order they end in.
    started = time.monotonic()
    answers = await asyncio.gather(*(client.get("/hit/100/c") for _ in range(3)))
    assert time.monotonic() - started >= 0.1  # each held for its 100 ms
    assert sorted([await resp.text() for resp in answers]) == ["1\n", "2\n", "3\n"]
    await client.post("/__hits/reset")
    assert await (await client.get("/hit/0/a")).text() == "1\n"


@pytest.mark.parametrize(("status", "seconds"), [(429, 120), (503, 0), (503, 5)])
async def test_retry_after_sends_the_status_and_delta_seconds(client, status, seconds):
    resp = await client.get(f"/retry-after/{status}/{seconds}/a")
    assert resp.status == status
    assert resp.headers["Retry-After"] == str(seconds)


@pytest.mark.parametrize(("status", "seconds"), [(503, 3600), (429, 30), (503, -60)])
async def test_retry_after_date_is_an_http_date_seconds_from_now(client, status, seconds):
    resp = await client.get(f"/retry-after-date/{status}/{seconds}")
    assert resp.status == status
    value = resp.headers["Retry-After"]
    assert value.endswith(" GMT")
    expected = datetime.now(UTC) + timedelta(seconds=seconds)
    assert abs(parsedate_to_datetime(value) - expected) < timedelta(seconds=5)


@pytest.mark.parametrize("path", ["/retry-after/200/1", "/retry-after/503/-1", "/retry-after/503/x"])
async def test_retry_after_rejects_bad_values_with_400(client, path):
    assert (await client.get(path)).status == 400


# --- seeded randomness -----------------------------------------------------------------------


async def statuses(client, paths: list[str]) -> list[int]:
    responses = await asyncio.gather(*(client.get(path) for path in paths))
    return [resp.status for resp in responses]


async def test_random_answers_are_reproducible_by_seed_and_path(aiohttp_client):
    paths = [f"/random/{i}" for i in range(60)]
    seed_7, again, seed_8 = [await aiohttp_client(create_app(seed=seed), timeout=TIMEOUT) for seed in (7, 7, 8)]
    first = await statuses(seed_7, paths)
    assert first == [random_outcome(7, path)[0] for path in paths]
    assert await statuses(again, paths) == first
    assert await statuses(seed_7, paths) == first  # asking again changes nothing
    assert await statuses(seed_8, paths) != first


async def test_random_waits_the_drawn_latency(client):
    path = next(f"/random/{i}" for i in range(1000) if random_outcome(0, f"/random/{i}")[1] > 30)
    started = time.monotonic()
    await (await client.get(path)).read()
    assert time.monotonic() - started >= random_outcome(0, path)[1] / 1000


def test_random_outcome_draws_mostly_200_and_latencies_up_to_50_ms():
    outcomes = [random_outcome(0, f"/random/{i}") for i in range(4000)]
    counts = {status: sum(1 for s, _ in outcomes if s == status) for status in (200, 500, 503)}
    assert sum(counts.values()) == 4000
    assert 3400 < counts[200] < 3800
    assert 100 < counts[500] < 300
    assert 100 < counts[503] < 300
    assert all(0 <= ms <= MAX_RANDOM_LATENCY_MS for _, ms in outcomes)


def test_random_outcome_is_the_same_in_another_process():
    code = "from crawler.mock.behaviours import random_outcome as r\nprint([r(5, f'/random/{i}') for i in range(20)])"
    env = dict(os.environ, PYTHONHASHSEED="12345")  # str hashes differ; the draws must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert out.stdout.strip() == str([random_outcome(5, f"/random/{i}") for i in range(20)])


# --- conditional requests --------------------------------------------------------------------


async def test_etag_is_stable_per_path_and_cacheable(aiohttp_client, client):
    resp = await client.get("/etag/a")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == CACHE_CONTROL == "max-age=60"
    tag = resp.headers["ETag"]
    assert tag.startswith('"') and tag.endswith('"') and len(tag) == 18
    assert (await client.get("/etag/b")).headers["ETag"] != tag
    other_server = await aiohttp_client(create_app(seed=9), timeout=TIMEOUT)
    assert (await other_server.get("/etag/a")).headers["ETag"] == tag


async def test_etag_answers_304_when_if_none_match_matches(client):
    tag = (await client.get("/etag/a")).headers["ETag"]
    for header in [tag, f"W/{tag}", "*", f'"nope", {tag}']:
        resp = await client.get("/etag/a", headers={"If-None-Match": header})
        assert resp.status == 304, header
        assert resp.headers["ETag"] == tag
        assert resp.headers["Cache-Control"] == CACHE_CONTROL
        assert await resp.read() == b""
    assert (await client.get("/etag/a", headers={"If-None-Match": '"nope"'})).status == 200


async def test_last_modified_answers_304_when_not_modified_since(client):
    resp = await client.get("/last-modified/a")
    assert resp.status == 200
    assert resp.headers["Last-Modified"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    for since, status in [
        ("Mon, 01 Jan 2024 00:00:00 GMT", 304),
        ("Tue, 02 Jan 2024 00:00:00 GMT", 304),
        ("Sun, 31 Dec 2023 23:59:59 GMT", 200),
        ("not a date", 200),
    ]:
        resp = await client.get("/last-modified/a", headers={"If-Modified-Since": since})
        assert resp.status == status, since
        assert resp.headers["Last-Modified"] == "Mon, 01 Jan 2024 00:00:00 GMT"
