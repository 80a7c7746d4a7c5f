"""Retry decisions: Retry-After parsing, backoff with full jitter and decide(), all pure."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crawler.fetch.retry import Decision, RetryPolicy, backoff, decide, parse_retry_after
from crawler.kinds import OVERLOAD_KINDS
from crawler.settings import Settings

pytestmark = pytest.mark.one_server

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
POLICY = Settings().retry_policy  # max_attempts=3, base 0.5, cap 30, statuses 429/502/503/504, Retry-After cap 120

# --- the policy from the settings -------------------------------------------------------------


def test_the_policys_defaults_are_the_settings_defaults() -> None:
    assert RetryPolicy() == POLICY
    assert POLICY == RetryPolicy(
        max_attempts=3,
        backoff_base=0.5,
        backoff_max=30.0,
        retry_statuses=frozenset({429, 502, 503, 504}),
        retry_after_max=120.0,
    )


@given(
    st.integers(1, 20),
    st.floats(0.0, 10.0),
    st.floats(0.0, 600.0),
    st.lists(st.integers(100, 599)),
    st.floats(0.0, 3600.0),
)
def test_the_settings_retry_policy_carries_each_retry_setting(attempts, base, cap, statuses, retry_after) -> None:
    settings = Settings(
        max_attempts=attempts, backoff_base=base, backoff_max=cap, retry_statuses=statuses, retry_after_max=retry_after
    )
    assert settings.retry_policy == RetryPolicy(
        max_attempts=attempts,
        backoff_base=base,
        backoff_max=cap,
        retry_statuses=frozenset(statuses),
        retry_after_max=retry_after,
    )


# --- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("7", 7.0), (" 120 ", 120.0), ("86400", 86400.0)],
)
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_as_a_future_http_date_is_the_seconds_until_then() -> None:
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)  # "Wed, 01 May 2024 12:01:30 GMT"
    assert parse_retry_after(header, now=NOW) == 90.0


def test_retry_after_as_a_past_http_date_means_no_wait() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=NOW) == 0.0


def test_retry_after_as_an_http_date_without_a_zone_is_read_as_utc() -> None:
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 -0000", now=NOW) == 30.0


def test_retry_after_as_an_http_date_defaults_to_the_current_time() -> None:
    header = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    assert 3590 <= parse_retry_after(header) <= 3600


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "1e3",
        "0x10",
        "Wed, 32 Foo 2024 99:00:00 GMT",
        "Mon, 01 Jan 99999 00:00:00 GMT",
    ],
)
def test_unreadable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", ["²", "1²", "①"])
def test_a_retry_after_of_non_ascii_digits_is_none(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


# Any header text that is not one of the non-ASCII digits above: a number of seconds >= 0, or None.
@given(st.text().filter(lambda text: not any(ch.isdigit() and not ch.isdecimal() for ch in text)))
@example("12")
@example("Wed, 21 Oct 2015 07:28:00 GMT")
def test_parse_retry_after_never_raises_and_never_goes_negative(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or seconds >= 0


@given(st.integers(0, 10**9))
def test_retry_after_seconds_round_trip(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=NOW) == float(seconds)


# --- backoff ----------------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    backoff_base=st.floats(0.0, 10.0),
    backoff_max=st.floats(0.0, 600.0),
)


@given(policies, st.integers(0, 64), st.integers(0, 2**32))
def test_backoff_is_full_jitter_within_zero_and_the_capped_exponential(policy, attempts, seed) -> None:
    ceiling = min(policy.backoff_max, policy.backoff_base * 2 ** max(0, attempts - 1))
    delay = backoff(attempts, policy, random.Random(seed))
    assert 0.0 <= delay <= ceiling


@given(st.integers(0, 2**32))
def test_backoff_with_the_same_seed_is_the_same(seed: int) -> None:
    assert backoff(3, POLICY, random.Random(seed)) == backoff(3, POLICY, random.Random(seed))


def test_backoff_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    class Top(random.Random):  # always the top of the range: the ceiling itself
        def uniform(self, a: float, b: float) -> float:
            return b

    top = Top()
    assert [backoff(n, POLICY, top) for n in range(1, 10)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff(0, POLICY, top) == 0.5


def test_backoff_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [backoff(4, POLICY, rng) for _ in range(2000)]  # ceiling 4.0
    assert min(delays) < 0.1 and max(delays) > 3.9


def test_backoff_after_very_many_attempts_is_still_capped() -> None:
    assert 0.0 <= backoff(1025, POLICY, random.Random(1)) <= POLICY.backoff_max


# --- decide -----------------------------------------------------------------------------------


def _decide(error_kind=None, status=None, retry_after=None, attempts=1, policy=POLICY, seed=1) -> Decision:
    return decide(
        error_kind=error_kind,
        status=status,
        retry_after=retry_after,
        attempts=attempts,
        policy=policy,
        rng=random.Random(seed),
    )


@pytest.mark.parametrize("kind", sorted(OVERLOAD_KINDS))
def test_transient_failures_are_retried_until_max_attempts(kind: str) -> None:
    assert OVERLOAD_KINDS == {"timeout", "connect", "reset"}
    for attempts in (1, 2):
        decision = _decide(error_kind=kind, attempts=attempts)
        assert decision.retry
        assert 0.0 <= decision.delay <= POLICY.backoff_base * 2 ** (attempts - 1)
    assert _decide(error_kind=kind, attempts=3) == Decision(False)
    assert _decide(error_kind=kind, attempts=4) == Decision(False)


@pytest.mark.parametrize("status", [429, 502, 503, 504])
@pytest.mark.parametrize("kind", [None, "http_status"])
def test_retryable_statuses_are_retried_until_max_attempts(status: int, kind: str | None) -> None:
    assert _decide(error_kind=kind, status=status, attempts=1).retry
    assert _decide(error_kind=kind, status=status, attempts=2).retry
    assert not _decide(error_kind=kind, status=status, attempts=3).retry


@pytest.mark.parametrize("status", [200, 301, 400, 401, 403, 404, 410, 500, 501])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert _decide(error_kind="http_status" if status >= 400 else None, status=status) == Decision(False)


@pytest.mark.parametrize(
    "kind", ["blocked", "invalid_url", "body_too_large", "tls", "dns", "protocol", "too_many_redirects", "internal"]
)
def test_permanent_failures_are_not_retried(kind: str) -> None:
    assert _decide(error_kind=kind, status=None) == Decision(False)
    assert _decide(error_kind=kind, status=503) == Decision(False)  # the kind wins over the status


def test_a_retry_status_outside_the_policy_is_not_retried() -> None:
    policy = RetryPolicy(retry_statuses=frozenset({503}))
    assert not _decide(error_kind="http_status", status=429, policy=policy).retry
    assert _decide(error_kind="http_status", status=503, policy=policy).retry


def test_max_attempts_of_one_never_retries() -> None:
    assert _decide(error_kind="timeout", policy=RetryPolicy(max_attempts=1)) == Decision(False)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_for_429_and_503(status: int) -> None:
    assert _decide(error_kind="http_status", status=status, retry_after="17") == Decision(True, 17.0)


@pytest.mark.parametrize("status", [502, 504])
def test_retry_after_is_ignored_for_other_statuses(status: int) -> None:
    decision = _decide(error_kind="http_status", status=status, retry_after="17")
    assert decision.retry and decision.delay <= POLICY.backoff_base


def test_a_zero_or_past_retry_after_falls_back_to_backoff() -> None:
    for header in ("0", "Wed, 21 Oct 2015 07:28:00 GMT"):
        decision = _decide(error_kind="http_status", status=503, retry_after=header, attempts=2)
        assert decision.retry and 0.0 <= decision.delay <= 1.0


def test_an_unreadable_retry_after_falls_back_to_backoff() -> None:
    decision = _decide(error_kind="http_status", status=429, retry_after="later, please")
    assert decision.retry and 0.0 <= decision.delay <= POLICY.backoff_base


def test_a_retry_after_at_the_cap_is_honoured() -> None:
    assert _decide(error_kind="http_status", status=429, retry_after="120") == Decision(True, 120.0)


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_beyond_the_cap_is_not_retried_and_says_why(status: int) -> None:
    decision = _decide(error_kind="http_status", status=status, retry_after="3600")
    assert decision.retry is False
    assert decision.reason is not None
    assert "3600" in decision.reason and "120" in decision.reason and "cap" in decision.reason


def test_a_retry_after_beyond_the_cap_respects_a_custom_cap() -> None:
    policy = RetryPolicy(retry_after_max=10.0)
    decision = _decide(error_kind="http_status", status=503, retry_after="11", policy=policy)
    assert not decision.retry and "10s cap" in decision.reason
    assert _decide(error_kind="http_status", status=503, retry_after="10", policy=policy) == Decision(True, 10.0)


def test_a_timeout_on_a_503_honours_its_retry_after() -> None:
    # The status arrived, then reading the body timed out: still the server's wish to wait.
    assert _decide(error_kind="timeout", status=503, retry_after="5") == Decision(True, 5.0)


@given(
    st.sampled_from([None, "http_status", "timeout", "connect", "reset", "dns", "blocked", "protocol"]),
    st.one_of(st.none(), st.integers(100, 599)),
    st.one_of(st.none(), st.integers(0, 1000).map(str)),
    st.integers(1, 20),
    st.integers(1, 10),
)
def test_decide_never_retries_past_max_attempts_and_never_waits_negative(kind, status, header, attempts, max_attempts):
    policy = RetryPolicy(max_attempts=max_attempts)
    decision = _decide(error_kind=kind, status=status, retry_after=header, attempts=attempts, policy=policy)
    if attempts >= max_attempts:
        assert not decision.retry
    if decision.retry:
        assert 0.0 <= decision.delay <= max(policy.backoff_max, policy.retry_after_max)
    else:
        assert decision.delay == 0.0


@pytest.mark.parametrize("kind", ["blocked", "invalid_url", "body_too_large", "tls", "protocol", "internal"])
def test_a_transient_dns_failure_is_retried_and_nothing_else_becomes_retryable(kind: str) -> None:
    def decided(error_kind, transient, attempts=1):
        return decide(
            error_kind=error_kind,
            status=None,
            retry_after=None,
            attempts=attempts,
            policy=POLICY,
            rng=random.Random(1),
            transient=transient,
        )

    assert decided("dns", True).retry and not decided("dns", True, attempts=POLICY.max_attempts).retry
    assert not decided("dns", False).retry  # NXDOMAIN: the name does not exist
    assert not decided(kind, True).retry  # the flag speaks of dns failures alone


# --- the delay is the policy's own draw ---------------------------------------------------------


class Top(random.Random):
    """Always the top of the range: the backoff's ceiling itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_backoff_delay_is_drawn_from_the_given_generator() -> None:
    # The worker passes its own generator (seeded in tests); the decision must use it, not the
    # module's global one: the ceiling after 3 attempts is 0.5 * 2^2.
    decision = decide(
        error_kind="connect", status=None, retry_after=None, attempts=3, policy=RetryPolicy(max_attempts=5), rng=Top()
    )
    assert decision == Decision(True, 2.0)


@pytest.mark.parametrize("header", ["0", "Wed, 21 Oct 2015 07:28:00 GMT", "soon"])
def test_a_retry_after_that_asks_no_wait_gets_the_generators_backoff(header: str) -> None:
    decision = decide(error_kind="http_status", status=503, retry_after=header, attempts=2, policy=POLICY, rng=Top())
    assert decision == Decision(True, 1.0)


def test_a_retry_after_of_one_second_is_one_second_not_a_backoff() -> None:
    capped_low = RetryPolicy(backoff_base=0.01, backoff_max=0.01)
    assert decide(
        error_kind="http_status", status=429, retry_after="1", attempts=2, policy=capped_low, rng=Top()
    ) == Decision(True, 1.0)


def test_the_backoff_exponent_stops_at_two_to_the_64th() -> None:
    # Past 2^64 the float would overflow long after any sane cap; without a cap it stops there.
    uncapped = RetryPolicy(backoff_base=1.0, backoff_max=float("inf"))
    assert backoff(10_000, uncapped, Top()) == 2.0**64
    assert backoff(65, uncapped, Top()) == 2.0**64
