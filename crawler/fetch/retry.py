"""Retry decisions for requests: pure functions of an outcome, the attempts made and the policy.

Which failures are retried, how long to wait (exponential backoff with full jitter, or the
server's Retry-After up to a cap). The worker schedules the wait; nothing here sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from crawler.kinds import ANSWERED_KINDS, OVERLOAD_KINDS, ErrorKind
from crawler.settings import DECLARATIONS

_DEFAULT = {
    name: DECLARATIONS[name].default
    for name in ("max_attempts", "backoff_base", "backoff_max", "retry_statuses", "retry_after_max")
}


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """A job's retry settings, as `Settings.retry_policy` gives them. The defaults are the
    settings' own, declared there once, so that a test names only what it changes."""

    max_attempts: int = _DEFAULT["max_attempts"]
    backoff_base: float = _DEFAULT["backoff_base"]
    backoff_max: float = _DEFAULT["backoff_max"]
    retry_statuses: frozenset[int] = frozenset(_DEFAULT["retry_statuses"])
    retry_after_max: float = _DEFAULT["retry_after_max"]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent
    or unreadable. A date in the past means no wait."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def backoff(attempts: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempts-1))]."""
    exponent = min(max(0, attempts - 1), 64)  # past 2^64 the cap has long won; avoid overflow
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0**exponent)
    return (rng or random).uniform(0.0, ceiling)


@dataclass(slots=True, frozen=True)
class Decision:
    retry: bool
    delay: float = 0.0
    reason: str | None = None  # why a retryable failure was not retried


FINAL = Decision(False)  # most attempts' decision: one frozen instance, not one per request


def decide(
    *,
    error_kind: str | None,
    status: int | None,
    retry_after: str | None,
    attempts: int,
    policy: RetryPolicy,
    rng: random.Random | None = None,
    transient: bool = False,
) -> Decision:
    """Whether to try again after `attempts` attempts ended like this, and after how long.
    `transient`: a `dns` failure of the resolver (SERVFAIL, a lookup timeout), retried like a
    connection error; a name that does not exist is `dns` too and is not."""
    # A busy host or a dropped connection (OVERLOAD_KINDS) may well answer the next try.
    retryable = (
        error_kind in OVERLOAD_KINDS
        or (transient and error_kind == ErrorKind.DNS)
        or (error_kind in ANSWERED_KINDS and status is not None and status in policy.retry_statuses)
    )
    if not retryable or attempts >= policy.max_attempts:
        return FINAL
    wait = parse_retry_after(retry_after) if status in (429, 503) else None
    if wait is not None:
        if wait > policy.retry_after_max:
            return Decision(False, reason=f"Retry-After of {wait:.0f}s exceeds the {policy.retry_after_max:.0f}s cap")
        return Decision(True, wait if wait > 0 else backoff(attempts, policy, rng))
    return Decision(True, backoff(attempts, policy, rng))
