"""The error kinds a result can carry, defined once: what failures.classify returns, what the
retry, host and robots decisions read, what `crawler retry --kinds` accepts and what the ledger
stores. A member is its string (StrEnum), so stored values, SQL parameters and JSON stay plain text.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    # In the order `crawler retry` lists them in its error message.
    TIMEOUT = "timeout"
    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    RESET = "reset"
    PROTOCOL = "protocol"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    BODY_TOO_LARGE = "body_too_large"
    BLOCKED = "blocked"
    INVALID_URL = "invalid_url"
    HTTP_STATUS = "http_status"  # the server answered, with a status of 400 or more
    INTERNAL = "internal"
    ROBOTS = "robots"  # refused by the host's robots.txt (--robots obey), or robots.txt unreachable; never retried


# A request the server answered: no error kind, or an HTTP status of 400 or more. A set read per
# request, as is OVERLOAD_KINDS: a member looked up on its enum costs 0.12 us (Python 3.11).
ANSWERED_KINDS = frozenset({None, ErrorKind.HTTP_STATUS})

# What a busy host or a dropped connection causes: retried (retry.decide), and read as the host's
# overload, which halves its concurrency (hosts.HostScheduler). One set, so the two cannot drift.
OVERLOAD_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECT, ErrorKind.RESET})
