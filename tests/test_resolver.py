"""Name lookups against a DNS responder this test starts on loopback: good names, NXDOMAIN,
SERVFAIL and silence, each answer cached for its TTL in bounded memory, each name asked once
however many requests wait for it, lookups bounded in number; then the same through the fetcher
and a whole crawl, where NXDOMAIN is final and a resolver's failure is retried."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dnslib import DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_cli, test_settings
from crawler.errors import EXIT_OK, UsageError
from crawler.fetch import resolver as resolver_module
from crawler.fetch.fetcher import Fetcher
from crawler.fetch.resolver import CachingResolver, DNSFailure, NameCache, parse_server
from crawler.fetch.retry import RetryPolicy, decide
from crawler.job.crawl import crawl
from crawler.mock.dns_responder import (
    NXDOMAIN,
    SERVFAIL,
    A,
    Question,
    Reply,
    parse_question,
    reply_packet,
    start_responder,
    zone_answer,
)

pytestmark = pytest.mark.one_server


def answer(question: Question) -> Reply:
    """By the name's first label: good-*, ttl30-*, nx-*, servfail-*, silent-*, slow-*."""
    label = question.name.split(".", 1)[0]
    if label.startswith("nx-"):
        return Reply(rcode=NXDOMAIN)
    if label.startswith("servfail-"):
        return Reply(rcode=SERVFAIL)
    if label.startswith("silent-"):
        return Reply(silent=True)
    if label.startswith("slow-"):
        return Reply(addresses=("127.0.0.1",), delay=0.2)
    return Reply(addresses=("127.0.0.1",), ttl=30 if label.startswith("ttl30-") else 300)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def channel_per_lookup(monkeypatch):
    """Each lookup on a fresh c-ares channel: what the responder is asked is then what our
    cache did not answer, not what c-ares's own cache (on the real clock) kept."""
    monkeypatch.setattr(resolver_module, "LOOKUPS_PER_CHANNEL", 1)


@pytest.fixture
async def responder():
    transport, counts, where = await start_responder(answer)
    counts.where = where
    yield counts
    transport.close()


@pytest.fixture
async def resolver(responder):
    made = []

    def make(**options) -> CachingResolver:
        made.append(CachingResolver(servers=[responder.where], **{"timeout": 1.0, **options}))
        return made[-1]

    yield make
    for r in made:
        await r.close()


def asked(responder, name: str) -> int:
    return responder.asked[name, A]


async def test_a_good_name_is_asked_once_however_many_wait_for_it(responder, resolver):
    r = resolver()
    answers = await asyncio.gather(*(r.resolve("good-1.test", 443, socket.AF_INET) for _ in range(20)))
    assert all(a == [answers[0][0]] for a in answers)
    assert answers[0][0]["host"] == "127.0.0.1" and answers[0][0]["port"] == 443
    for _ in range(5):
        await r.resolve("good-1.test", 80, socket.AF_INET)
    assert asked(responder, "good-1.test") == 1
    assert r.lookups == 1


async def test_an_answer_is_asked_again_once_its_ttl_or_the_cap_is_over(responder, resolver):
    clock = Clock()
    r = resolver(clock=clock, max_ttl=100.0)
    await r.resolve("ttl30-a.test", 80, socket.AF_INET)
    await r.resolve("good-b.test", 80, socket.AF_INET)  # TTL 300, kept at most 100 s
    clock.now += 29
    await r.resolve("ttl30-a.test", 80, socket.AF_INET)
    assert asked(responder, "ttl30-a.test") == 1
    clock.now += 2  # past its own TTL of 30 s
    await r.resolve("ttl30-a.test", 80, socket.AF_INET)
    await r.resolve("good-b.test", 80, socket.AF_INET)
    assert asked(responder, "ttl30-a.test") == 2 and asked(responder, "good-b.test") == 1
    clock.now += 70  # past the 100 s cap
    await r.resolve("good-b.test", 80, socket.AF_INET)
    assert asked(responder, "good-b.test") == 2


async def test_nxdomain_is_permanent_and_remembered(responder, resolver):
    r = resolver()
    for _ in range(3):
        with pytest.raises(DNSFailure) as failed:
            await r.resolve("nx-1.test", 80, socket.AF_INET)
        assert not failed.value.transient and "NXDOMAIN" in failed.value.strerror
    assert asked(responder, "nx-1.test") == 1


async def test_servfail_is_transient_and_asked_again(responder, resolver):
    r = resolver()
    for _ in range(2):
        with pytest.raises(DNSFailure) as failed:
            await r.resolve("servfail-1.test", 80, socket.AF_INET)
        assert failed.value.transient and "SERVFAIL" in failed.value.strerror
    assert r.lookups == 2 and asked(responder, "servfail-1.test") >= 2


async def test_silence_is_a_transient_failure_within_the_timeout(responder, resolver):
    r = resolver(timeout=0.4)
    with pytest.raises(DNSFailure) as failed:
        await r.resolve("silent-1.test", 80, socket.AF_INET)
    assert failed.value.transient and "no answer" in failed.value.strerror
    assert asked(responder, "silent-1.test") >= 1


async def test_the_cache_keeps_only_so_many_names(responder, resolver):
    r = resolver(cache_size=2)
    for name in ("good-1.test", "good-2.test", "good-3.test"):
        await r.resolve(name, 80, socket.AF_INET)
    assert len(r.cache) == 2
    await r.resolve("good-3.test", 80, socket.AF_INET)  # kept
    await r.resolve("good-1.test", 80, socket.AF_INET)  # the least recently used, dropped
    assert asked(responder, "good-3.test") == 1 and asked(responder, "good-1.test") == 2


async def test_lookups_in_flight_are_bounded(responder, resolver):
    r = resolver(concurrency=2)
    await asyncio.gather(*(r.resolve(f"slow-{i}.test", 80, socket.AF_INET) for i in range(6)))
    assert r.lookups == 6
    assert responder.most_waiting == 2  # six names, never more than two asked at once


async def test_c_ares_channels_are_replaced_and_closed_so_their_own_cache_stays_small(responder, resolver, monkeypatch):
    monkeypatch.setattr(resolver_module, "LOOKUPS_PER_CHANNEL", 2)
    r = resolver(cache_size=0)
    first = r._dns
    # Lookups still under way on a replaced channel finish there; then it is closed.
    answers = await asyncio.gather(*(r.resolve(f"slow-{i}.test", 80, socket.AF_INET) for i in range(6)))
    assert all(a[0]["host"] == "127.0.0.1" for a in answers)
    assert r.channels == 3 and list(r._in_flight) == [r._dns] and first._closed
    for _ in range(3):
        await r.resolve("good-1.test", 80, socket.AF_INET)
    # No cache of ours: c-ares's own answers the second lookup of a channel, no more.
    assert asked(responder, "good-1.test") == 2
    assert r.channels == 5 and len(r._in_flight) == 1


def test_the_responders_packets_are_dns():
    query = DNSRecord.question("Good-1.Bench.Test", "A").pack()
    question = parse_question(query)
    assert question.name == "good-1.bench.test" and question.qtype == A
    reply = DNSRecord.parse(reply_packet(question, zone_answer("bench.test", ttl=42)(question)))
    assert reply.header.id == DNSRecord.parse(query).header.id and reply.header.rcode == 0
    assert [(str(rr.rname), str(rr.rdata), rr.ttl) for rr in reply.rr] == [("Good-1.Bench.Test.", "127.0.0.1", 42)]
    other = parse_question(DNSRecord.question("elsewhere.example", "A").pack())
    assert DNSRecord.parse(reply_packet(other, zone_answer("bench.test")(other))).header.rcode == NXDOMAIN
    assert parse_question(b"\x00" * 5) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1", "127.0.0.1:53"),
        ("127.0.0.1:5353", "127.0.0.1:5353"),
        ("::1", "[::1]:53"),
        ("[::1]:5353", "[::1]:5353"),
    ],
)
def test_dns_server_values(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["resolver.example", "127.0.0.1:0", "127.0.0.1:99999", "[::1", "1.2.3.4:x", ""])
def test_a_bad_dns_server_is_one_sentence(text):
    with pytest.raises(UsageError, match=r"^DNS server .* must be an IP address"):
        parse_server(text)


def test_a_bad_dns_server_flag_stops_the_command_with_one_sentence(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://good-1.test/\n")
    result = run_cli("crawl", str(path), "--dns-server", "resolver.example", "--dsn", "postgresql://unused/")
    assert result.returncode == 1
    assert result.stderr.decode().strip().startswith("crawler: DNS server 'resolver.example' must be")
    assert "Traceback" not in result.stderr.decode()


async def test_the_fetcher_resolves_through_the_given_server_and_classifies_failures(responder, mock_url):
    port = mock_url.rsplit(":", 1)[1]
    settings = test_settings(dns_servers=[responder.where], dns_timeout=0.4)
    async with Fetcher(settings) as fetcher:
        good = await fetcher.attempt("GET", f"http://good-1.test:{port}/ok/1")
        again = await fetcher.attempt("GET", f"http://good-1.test:{port}/ok/2")
        missing = await fetcher.attempt("GET", f"http://nx-1.test:{port}/ok/1")
        failing = await fetcher.attempt("GET", f"http://servfail-1.test:{port}/ok/1")
        silent = await fetcher.attempt("GET", f"http://silent-1.test:{port}/ok/1")
    assert (good.status, again.status) == (200, 200)
    assert (missing.error_kind, missing.transient) == ("dns", False) and "NXDOMAIN" in missing.error
    assert "nx-1.test" in missing.error
    assert (failing.error_kind, failing.transient) == ("dns", True) and "SERVFAIL" in failing.error
    assert (silent.error_kind, silent.transient) == ("dns", True)
    policy = RetryPolicy(max_attempts=3)

    def retried(attempt) -> bool:
        return decide(
            error_kind=attempt.error_kind,
            status=attempt.status,
            retry_after=None,
            attempts=1,
            policy=policy,
            transient=attempt.transient,
        ).retry

    assert not retried(missing) and retried(failing) and retried(silent)


async def test_a_crawl_by_name_retries_a_failing_resolver_not_a_missing_name(
    session_dsn, db, responder, mock_url, tmp_path
):
    port = mock_url.rsplit(":", 1)[1]
    path = tmp_path / "names.txt"
    path.write_text(
        "".join(f"http://good-{i % 3}.test:{port}/ok/{i}\n" for i in range(30))
        + f"http://nx-1.test:{port}/a\nhttp://servfail-1.test:{port}/b\n"
    )
    settings = test_settings(dns_servers=[responder.where], max_attempts=3, allow_net=["127.0.0.1/32"])
    code = await crawl(
        session_dsn, settings, input_path=str(path), url_column=None, job_name="by-name", summary_json=None, quiet=True
    )
    assert code == EXIT_OK
    rows = await db.fetch(
        "SELECT r.row_no, r.status, r.error_kind, r.error, r.attempts FROM results r"
        " JOIN jobs j ON j.id = r.job_id WHERE j.name = 'by-name' ORDER BY r.row_no"
    )
    assert len(rows) == 32
    assert all(row["status"] == 200 for row in rows[:30])
    assert (rows[30]["error_kind"], rows[30]["attempts"]) == ("dns", 1)
    assert (rows[31]["error_kind"], rows[31]["attempts"]) == ("dns", 3)
    # Each worker asks about each good name once, however many of its rows name it.
    workers = settings.effective_workers()
    assert all(1 <= asked(responder, f"good-{i}.test") <= workers for i in range(3))


@given(
    st.lists(st.tuples(st.sampled_from(["put", "get", "tick"]), st.integers(0, 9), st.integers(0, 50)), max_size=200),
    st.integers(0, 5),
)
def test_the_name_cache_is_bounded_and_never_answers_past_a_ttl(operations, size):
    clock = Clock()
    cache = NameCache(size, clock)
    expires: dict = {}
    for op, name, ttl in operations:
        key = f"n{name}.test"
        if op == "put":
            cache.put(key, ("127.0.0.1",), float(ttl))
            if size and ttl > 0:
                expires[key] = clock.now + ttl
        elif op == "get":
            answer = cache.get(key)
            if answer is not None:
                assert clock.now < expires[key] == answer.expires
        else:
            clock.now += ttl
        assert len(cache) <= size


def test_expired_answers_leave_the_cache_as_new_ones_come_in_without_being_asked_for():
    """A crawl's many names shrink back with their TTLs: the cache's memory follows the names
    met within a TTL, not its size."""
    clock = Clock()
    cache = NameCache(100_000, clock)
    for i in range(1000):
        cache.put(f"early-{i}.test", ("127.0.0.1",), 30.0)
    clock.now += 10
    cache.put("middle.test", ("127.0.0.1",), 300.0)
    clock.now += 25  # the early names' TTL is over, the middle one's is not
    cache.put("late.test", ("127.0.0.1",), 300.0)
    assert len(cache) == 2
    assert cache.get("middle.test") is not None and cache.get("early-0.test") is None


def test_the_name_cache_gives_back_what_it_was_given():
    """Kept compactly (one address as itself), an answer comes back as it went in: one address,
    several in their order, or the failure that stands for the name."""
    clock = Clock()
    cache = NameCache(10, clock)
    gone = DNSFailure("gone.test", "no such name (NXDOMAIN)", transient=False)
    cache.put("one.test", ("127.0.0.1",), 30.0)
    cache.put("two.test", ("127.0.0.2", "::1"), 30.0)
    cache.put("gone.test", (), 30.0, gone)
    one, two, failed = cache.get("one.test"), cache.get("two.test"), cache.get("gone.test")
    assert (one.addresses, one.failure, one.expires) == (("127.0.0.1",), None, clock.now + 30.0)
    assert (two.addresses, two.failure) == (("127.0.0.2", "::1"), None)
    assert (failed.addresses, failed.failure) == ((), gone)


def test_an_answer_used_just_before_it_expires_does_not_stay_once_expired():
    """The cache keeps answers in the order they came, not the order they were used: a name
    asked for a moment before its answer expired leaves with the other expired ones as new names
    come in, instead of staying, expired, behind fresher answers."""
    clock = Clock()
    cache = NameCache(100, clock)
    cache.put("busy.test", ("127.0.0.1",), 30.0)
    clock.now += 10
    cache.put("later.test", ("127.0.0.2",), 300.0)
    clock.now += 15
    assert cache.get("busy.test") is not None  # used, 5 s before its answer expires
    clock.now += 10
    cache.put("new.test", ("127.0.0.3",), 300.0)
    assert len(cache) == 2 and cache.get("later.test") is not None
