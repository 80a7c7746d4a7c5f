"""robots.txt decisions, pure: RFC 9309's failure rules, the product token, the matching rule named
in a refusal, Crawl-delay capped; and the per-host pace a Crawl-delay sets in the scheduler."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crawler.fetch.hosts import HostScheduler
from crawler.fetch.robots import (
    BODY_LIMIT,
    RobotsOutcome,
    RobotsRules,
    RobotsVerdict,
    outcome_of,
    product_token,
    robots_url,
    unreachable,
)
from crawler.mock.behaviours import ROBOTS_FILES
from crawler.settings import Settings

pytestmark = pytest.mark.one_server

TOKEN = product_token(Settings().user_agent)


def rules(text: str, token: str = TOKEN, max_delay: float = 30.0) -> RobotsRules:
    return RobotsRules(RobotsOutcome(RobotsVerdict.RULES, text=text), token, max_delay)


def test_the_default_user_agent_names_the_crawler_its_version_and_a_contact() -> None:
    from crawler import __version__

    agent = Settings().user_agent
    assert agent.startswith(f"crawler/{__version__} (+") and "contact" in agent
    assert TOKEN == "crawler"


@pytest.mark.parametrize(
    "agent, token",
    [
        ("crawler/0.1 (+https://example.invalid/contact)", "crawler"),
        ("My_Bot-2/1.0", "my_bot-"),  # RFC 9309: letters, "_" and "-" only
        ("  Foo", "foo"),
        ("/1.0", "*"),
    ],
)
def test_the_product_token_is_the_user_agents_first_name(agent, token) -> None:
    assert product_token(agent) == token


def test_robots_url_is_at_the_root_of_the_host() -> None:
    assert robots_url("https://example.com:8443") == "https://example.com:8443/robots.txt"


# --- RFC 9309's failure rules ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_a_4xx_means_everything_is_allowed(status) -> None:
    outcome = outcome_of(status=status, error_kind="http_status", error=f"HTTP {status}", body=b"")
    assert outcome.verdict == RobotsVerdict.ALLOW_ALL and str(status) in outcome.reason


@pytest.mark.parametrize(
    "status, kind",
    [
        (500, "http_status"),
        (503, "http_status"),
        (429, "http_status"),
        (None, "connect"),
        (None, "timeout"),
        (None, "dns"),
        (None, "reset"),
    ],
)
def test_a_5xx_429_or_no_answer_is_tried_again(status, kind) -> None:
    assert outcome_of(status=status, error_kind=kind, error="x", body=None) is None


def test_after_the_retries_an_unreachable_robots_txt_disallows_everything_with_the_reason() -> None:
    refused = RobotsRules(unreachable("HTTP 500 Internal Server Error", 3), TOKEN, 30.0)
    reason = refused.refusal("http://a/anything")
    assert reason == "robots.txt unreachable: HTTP 500 Internal Server Error (3 attempts)"


def test_a_redirect_chain_too_long_means_everything_is_allowed() -> None:
    outcome = outcome_of(status=None, error_kind="too_many_redirects", error="more than 5 redirects", body=None)
    assert outcome.verdict == RobotsVerdict.ALLOW_ALL and "more than 5 redirects" in outcome.reason
    assert RobotsRules(outcome, TOKEN, 30).refusal("http://a/private/") is None


def test_a_blocked_address_allows_and_leaves_each_row_to_its_own_failure() -> None:
    outcome = outcome_of(status=None, error_kind="blocked", error="10.0.0.1: not allowed", body=None)
    assert outcome.verdict == RobotsVerdict.ALLOW_ALL


def test_a_2xx_is_parsed_its_first_500_kib_only_and_nul_made_storable() -> None:
    body = ROBOTS_FILES["huge"].encode()
    assert len(body) > BODY_LIMIT
    outcome = outcome_of(status=200, error_kind=None, error=None, body=body)
    assert outcome.verdict == RobotsVerdict.RULES and len(outcome.text) == BODY_LIMIT
    parsed = RobotsRules(outcome, TOKEN, 30)
    assert parsed.refusal("http://a/early/x") == "disallowed by robots.txt (Disallow: /early/)"
    assert parsed.refusal("http://a/late/x") is None  # past 500 KiB: not read
    odd = outcome_of(status=200, error_kind=None, error=None, body=b"User-agent: *\x00\nDisallow: /\xff/\n")
    assert "\x00" not in odd.text


# --- rules ---------------------------------------------------------------------------------------


def test_a_refusal_names_the_rule_and_the_longest_rule_wins() -> None:
    parsed = rules(ROBOTS_FILES["disallow"])
    assert parsed.refusal("http://a/private/x") == "disallowed by robots.txt (Disallow: /private/)"
    assert parsed.refusal("http://a/private/open/x") is None  # the longer Allow wins
    assert parsed.refusal("http://a/public") is None
    assert parsed.refusal("http://a/robots.txt") is None  # robots.txt itself is always allowed


def test_wildcards_and_end_anchors() -> None:
    parsed = rules(ROBOTS_FILES["wildcard"])
    assert parsed.refusal("http://a/docs/x.pdf") == "disallowed by robots.txt (Disallow: /*.pdf$)"
    assert parsed.refusal("http://a/docs/x.pdf?v=1") is None  # $ anchors the end
    assert parsed.refusal("http://a/blog/draft/1") == "disallowed by robots.txt (Disallow: /*/draft/)"


def test_the_group_of_the_crawlers_product_token_is_used_over_the_star_group() -> None:
    parsed = rules(ROBOTS_FILES["agent"])
    assert parsed.refusal("http://a/ok/1") is None
    assert parsed.refusal("http://a/ok/crawler-only/1") == "disallowed by robots.txt (Disallow: /ok/crawler-only/)"
    other = rules(ROBOTS_FILES["agent"], token="otherbot")
    assert other.refusal("http://a/ok/1") == "disallowed by robots.txt (Disallow: /)"


def test_non_ascii_paths_match_their_percent_encoded_form() -> None:
    parsed = rules("User-agent: *\nDisallow: /café/\n")
    assert parsed.refusal("http://a/caf%C3%A9/menu") is not None
    assert parsed.refusal("http://a/cafe/menu") is None


def test_crawl_delay_is_read_for_the_token_and_capped() -> None:
    assert rules("User-agent: *\nCrawl-delay: 2.5\n").delay == 2.5
    assert rules("User-agent: *\nCrawl-delay: 3600\n", max_delay=30.0).delay == 30.0
    assert rules("User-agent: *\nCrawl-delay: -4\n").delay == 0.0
    assert rules("User-agent: *\nDisallow:\n").delay == 0.0
    assert RobotsRules(RobotsOutcome(RobotsVerdict.ALLOW_ALL), TOKEN, 30.0).delay == 0.0


@given(st.text(max_size=300), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_file_and_path_give_a_decision_never_an_exception(text, path) -> None:
    parsed = rules(text)
    reason = parsed.refusal("http://a/" + path)
    assert reason is None or reason.startswith("disallowed by robots.txt")
    assert 0.0 <= parsed.delay <= 30.0


# --- the pace a Crawl-delay sets --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Item:
    def __init__(self, url: str) -> None:
        self.url = url


async def test_a_crawl_delay_paces_its_host_only_and_the_longer_of_it_and_the_rate_holds() -> None:
    clock = Clock()
    scheduler = HostScheduler(initial=10, maximum=10, rate=1.0, clock=clock)  # 1 s between starts
    scheduler.pace("http://slow", 3.0)
    for host in ("http://slow", "http://fast"):
        for i in range(2):
            scheduler.put(Item(f"{host}/{i}"))
    started = [scheduler.ready.get_nowait().url for _ in range(scheduler.ready.qsize())]
    assert started == ["http://slow/0", "http://fast/0"]
    assert scheduler.hosts["http://slow"].next_start == pytest.approx(103.0)  # the delay, longer than 1 s
    assert scheduler.hosts["http://fast"].next_start == pytest.approx(101.0)
    scheduler.pace("http://fast", 0.5)  # shorter than the rate: the rate holds
    clock.now = 101.0
    scheduler._wake("http://fast")
    assert scheduler.ready.get_nowait().url == "http://fast/1"
    assert scheduler.hosts["http://fast"].next_start == pytest.approx(102.0)
    for state in scheduler.hosts.values():
        if state.timer:
            state.timer.cancel()


async def test_holding_a_host_waits_a_whole_delay_before_its_first_start() -> None:
    clock = Clock()
    scheduler = HostScheduler(initial=10, maximum=10, clock=clock)
    scheduler.pace("http://h", 2.0, hold=True)
    scheduler.put(Item("http://h/0"))
    assert scheduler.ready.qsize() == 0
    clock.now = 102.0
    scheduler._wake("http://h")
    assert scheduler.ready.get_nowait().url == "http://h/0"
    await asyncio.sleep(0)


# --- the worker's gate: memory bounded whatever the hosts ------------------------------------------


def test_the_gate_keeps_parsed_rules_within_its_budget_with_100_000_hosts() -> None:
    from crawler.fetch import robots_gate
    from crawler.fetch.retry import RetryPolicy

    gate = robots_gate.RobotsGate(
        "postgresql://unused",
        1,
        "w",
        Settings(robots="obey"),
        RetryPolicy(),
        release=lambda item: None,
        refuse=None,
        pace=lambda *a: None,
    )
    small = RobotsOutcome(RobotsVerdict.RULES, text=ROBOTS_FILES["disallow"])
    huge = RobotsOutcome(RobotsVerdict.RULES, text="User-agent: *\n" + "Disallow: /x\n" * 40_000)
    # Parsed once each: the subject is the gate's budget over 100 000 hosts, not Protego's speed.
    small_rules, huge_rules = RobotsRules(small, TOKEN, 30.0), RobotsRules(huge, TOKEN, 30.0)
    for i in range(100_000):
        gate._remember(f"http://h{i}", huge_rules if i % 10_000 == 0 else small_rules)
        assert gate._weight <= robots_gate.RULES_BUDGET
    assert gate._weight == sum(r.weight for r in gate.rules.values())
    assert "http://h99999" in gate.rules and "http://h0" not in gate.rules  # the least recently used went
    assert len(gate.rules) < 20_000


# --- the mock server's robots.txt knobs ------------------------------------------------------------


async def test_the_mock_servers_robots_knobs_answer_as_documented() -> None:
    import aiohttp

    from crawler.mock.server import start_mock_server

    expected = {
        "none": (404, None),
        "allow": (200, ROBOTS_FILES["allow"]),
        "status:503": (503, None),
        "delay:1.5": (200, "User-agent: *\nCrawl-delay: 1.5\nDisallow: /private/\nAllow: /private/open/\n"),
        "redirect": (200, ROBOTS_FILES["disallow"]),
        "redirects:3": (200, "ok\n"),
        "huge": (200, ROBOTS_FILES["huge"]),
        "slow:10": (200, ROBOTS_FILES["disallow"]),
    }
    async with aiohttp.ClientSession() as session:
        for knob, (status, text) in expected.items():
            runner, base = await start_mock_server(robots=knob)
            try:
                async with session.get(f"{base}/robots.txt") as resp:
                    assert resp.status == status, knob
                    if text is not None:
                        assert await resp.text() == text, knob
            finally:
                await runner.cleanup()
        runner, base = await start_mock_server(robots="flaky:2")
        try:
            statuses = []
            for _ in range(3):
                async with session.get(f"{base}/robots.txt") as resp:
                    statuses.append(resp.status)
            assert statuses == [500, 500, 200]
            async with session.get(f"{base}/__arrivals") as resp:
                arrivals = (await resp.json())["arrivals"]
            assert [path for _, path in arrivals] == ["/robots.txt"] * 3
            assert arrivals == sorted(arrivals)
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("knob", ["nope", "delay", "delay:x", "allow:3"])
def test_an_unknown_robots_knob_is_one_sentence(knob) -> None:
    from conftest import run_cli
    from crawler.mock.server import create_app

    with pytest.raises(ValueError, match="unknown robots knob"):
        create_app(robots=knob)
    done = run_cli("mock-server", "--port", "0", "--robots", knob, timeout=60)
    assert done.returncode == 1 and b"unknown robots knob" in done.stderr and b"Traceback" not in done.stderr


async def test_after_robots_txt_the_first_row_waits_the_rate_interval_too() -> None:
    clock = Clock()
    scheduler = HostScheduler(initial=10, maximum=10, rate=2.0, clock=clock)  # 0.5 s between starts
    scheduler.pace("http://h", 0.0, hold=True)  # robots.txt just fetched, no Crawl-delay
    scheduler.put(Item("http://h/0"))
    assert scheduler.ready.qsize() == 0 and scheduler.hosts["http://h"].next_start == pytest.approx(100.5)
    scheduler.hosts["http://h"].timer.cancel()
