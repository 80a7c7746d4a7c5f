"""robots.txt decisions (RFC 9309), pure: what a fetch of a host's robots.txt means, whether a URL
may be fetched under it, and the pace it asks for. No I/O here: robots_gate fetches, the ledger
stores, this module only decides. Parsed with Protego (Scrapy's parser: wildcards, `$`, Allow and
Disallow precedence by length, Crawl-delay, non-ASCII paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protego import Protego

from crawler.kinds import OVERLOAD_KINDS, ErrorKind


class RobotsPolicy(StrEnum):
    """The `robots` setting."""

    IGNORE = "ignore"  # a list of URLs the user owns or may fetch: robots.txt is not read
    OBEY = "obey"  # others' sites: each host's robots.txt is read once per job and obeyed


class RobotsVerdict(StrEnum):
    """What a host's robots.txt fetch decided, as the ledger stores it."""

    RULES = "rules"  # a robots.txt was read: its rules decide
    ALLOW_ALL = "allow_all"  # unavailable (4xx, a redirect chain too long): everything allowed
    UNREACHABLE = "unreachable"  # 5xx or no answer, after the job's retries: everything disallowed


# RFC 9309 2.5: a parser must read at least 500 KiB; what follows is ignored, not an error.
BODY_LIMIT = 500 * 1024
# RFC 9309 2.3.1.2: follow at least five consecutive redirects; past them, robots.txt is unavailable.
MAX_REDIRECTS = 5
# Failures after which robots.txt is "unreachable" (RFC 9309 2.3.1.4): retried within the job,
# the host's rows held back meanwhile. 429 is read as the server's overload, like a 5xx, not as
# an unavailable file that would allow everything.
UNREACHABLE_KINDS = OVERLOAD_KINDS | {ErrorKind.DNS, ErrorKind.TLS, ErrorKind.PROTOCOL, ErrorKind.INTERNAL}

_PRODUCT_TOKEN = re.compile(r"[A-Za-z_-]+")


def robots_url(host: str) -> str:
    """The robots.txt of a host as hosts.host_of names it ('https://example.com:8443')."""
    return f"{host}/robots.txt"


def product_token(user_agent: str) -> str:
    """The name robots.txt groups are matched against (RFC 9309 2.2.1): the user agent's first
    product token, 'crawler' in 'crawler/0.1 (+https://example.invalid/contact)'."""
    match = _PRODUCT_TOKEN.match(user_agent.strip())
    return match.group(0).lower() if match else "*"


@dataclass(slots=True, frozen=True)
class RobotsOutcome:
    """A host's decided robots.txt: the verdict, the file's text (RULES) or why not (the others)."""

    verdict: RobotsVerdict
    text: str = ""
    reason: str = ""


def outcome_of(
    *, status: int | None, error_kind: str | None, error: str | None, body: bytes | None
) -> RobotsOutcome | None:
    """What one attempt at robots.txt decided; None when it is to be tried again (5xx, 429, no
    answer): meanwhile the host's rows wait, as RFC 9309 asks (disallowed while unreachable)."""
    if error_kind == ErrorKind.TOO_MANY_REDIRECTS:
        return RobotsOutcome(RobotsVerdict.ALLOW_ALL, reason=f"robots.txt unavailable: {error}")
    if error_kind in UNREACHABLE_KINDS or (error_kind is None and status is None):
        return None
    if error_kind is not None and status is None:
        # Refused before an answer for a reason a retry cannot change (a blocked address, an
        # invalid redirect): no robots.txt can be read, and each row meets its own failure.
        return RobotsOutcome(RobotsVerdict.ALLOW_ALL, reason=f"robots.txt unavailable: {error}")
    assert status is not None
    if status == 429 or status >= 500:
        return None
    if 200 <= status < 300:
        # PostgreSQL's text cannot hold NUL: the ledger stores the file with each one replaced.
        text = (body or b"")[:BODY_LIMIT].decode("utf-8", "replace").replace("\x00", "\ufffd")
        return RobotsOutcome(RobotsVerdict.RULES, text=text)
    # 4xx, and a 3xx that was not followed (no Location, or a 304 to a request without validators).
    return RobotsOutcome(RobotsVerdict.ALLOW_ALL, reason=f"robots.txt unavailable: HTTP {status}")


def unreachable(last_error: str, attempts: int) -> RobotsOutcome:
    """The verdict once the job's attempts at robots.txt all failed."""
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return RobotsOutcome(RobotsVerdict.UNREACHABLE, reason=f"robots.txt unreachable: {last_error} ({tries})")


def describe_failure(status: int | None, error: str | None) -> str:
    return error or (f"HTTP {status}" if status is not None else "no answer")


class RobotsRules:
    """A decided robots.txt, parsed once, asked for each URL of its host."""

    __slots__ = ("outcome", "token", "delay", "_parser", "weight")

    def __init__(self, outcome: RobotsOutcome, token: str, max_delay: float) -> None:
        self.outcome = outcome
        self.token = token
        self._parser = Protego.parse(outcome.text) if outcome.verdict == RobotsVerdict.RULES else None
        delay = self._parser.crawl_delay(token) if self._parser is not None else None
        # A file cannot stall the job: its Crawl-delay counts up to the job's cap.
        self.delay = min(max(delay or 0.0, 0.0), max_delay)
        # Bytes it costs to keep, as measured with tracemalloc: 1.9 KB for a file of a few lines,
        # 8 MB for 500 KiB of rules (16 bytes a character).
        self.weight = 2048 + 16 * len(outcome.text)

    def refusal(self, url: str) -> str | None:
        """None when `url` may be fetched; else why not, with the rule that forbids it."""
        verdict = self.outcome.verdict
        if verdict == RobotsVerdict.ALLOW_ALL:
            return None
        if verdict == RobotsVerdict.UNREACHABLE:
            return self.outcome.reason
        assert self._parser is not None
        if self._parser.can_fetch(url, self.token):
            return None
        rule = _matching_rule(self._parser, self.token, url)
        return f"disallowed by robots.txt ({rule})" if rule else "disallowed by robots.txt"


def _matching_rule(parser: Protego, token: str, url: str) -> str | None:
    """The rule that decided, as 'Disallow: /private/'. Protego says only yes or no; its rule
    set is read here (private, so any change in it costs the rule's text, never the decision)."""
    try:
        from protego._utils import _quote_path

        rule_set = parser._get_matching_rule_set(token)
        if rule_set is None:  # no group for this agent, nor a `*` one: nothing decided
            return None
        path = _quote_path(url)
        for rule in rule_set._rules:  # sorted as Protego decides: longest first, Allow on ties
            if rule.value.match(path):
                return f"{rule.field.capitalize()}: {rule.value._pattern}"
    except Exception:  # noqa: BLE001 - only the explanation is lost
        return None
    return None
