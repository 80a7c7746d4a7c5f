"""Which rows of a finished job `crawler retry` fetches again: the selection that its --kinds and
--status flags make. Pure: parses and decides, never touches the ledger (reopen_for_retry
applies the selection)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from crawler.errors import UsageError
from crawler.kinds import OVERLOAD_KINDS, ErrorKind

# Failures that another try, later, may well not meet again: the network's and the server's
# passing troubles. An http_status row is one when its status is one the job itself retries
# (its retry_statuses: 429, 502, 503 and 504 unless set otherwise).
TRANSIENT_KINDS = OVERLOAD_KINDS | {ErrorKind.DNS}
ALL_STATUSES = (100, 599)


class Selection(NamedTuple):
    kinds: frozenset[str]  # rows failed with one of these kinds (http_status is decided by statuses)
    statuses: tuple[tuple[int, int], ...]  # http_status rows with a status in one of these ranges

    def describe(self) -> str:
        parts = sorted(self.kinds)
        if self.statuses:
            parts.append("http_status " + ",".join(_status_range(lo, hi) for lo, hi in self.statuses))
        return ", ".join(parts)


def _status_range(lo: int, hi: int) -> str:
    if (lo, hi) == ALL_STATUSES:
        return "(any status)"
    return str(lo) if lo == hi else f"{lo // 100}xx" if hi - lo == 99 and lo % 100 == 0 else f"{lo}-{hi}"


def parse_kinds(text: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(ErrorKind))
    if unknown or not kinds:
        raise UsageError(
            f"'{unknown[0] if unknown else text}' in --kinds is not an error kind;"
            f" the kinds are {', '.join(ErrorKind)}."
        )
    return kinds


def parse_statuses(text: str) -> tuple[tuple[int, int], ...]:
    """'503', '5xx' or a comma list of them, as inclusive (low, high) ranges."""
    ranges = []
    for item in (part.strip().lower() for part in text.split(",")):
        if len(item) == 3 and item[0] in "12345" and item[1:] == "xx":
            ranges.append((int(item[0]) * 100, int(item[0]) * 100 + 99))
        elif item.isdigit() and 100 <= int(item) <= 599:
            ranges.append((int(item), int(item)))
        else:
            raise UsageError(f"'{item}' in --status is not a status code (100-599) or a class like 5xx.")
    return tuple(sorted(set(ranges)))


def selection(kinds: str | None, statuses: str | None, retry_statuses: Sequence[int]) -> Selection:
    """The rows to fetch again. Without flags: the transient kinds, and http_status answers with
    a status the job retries. --kinds replaces the kinds (http_status among them: every status);
    --status picks http_status answers by status, with whatever kinds are chosen."""
    chosen = parse_kinds(kinds) if kinds is not None else TRANSIENT_KINDS | {ErrorKind.HTTP_STATUS}
    if statuses is not None:
        ranges = parse_statuses(statuses)
    elif ErrorKind.HTTP_STATUS not in chosen:
        ranges = ()
    elif kinds is not None:
        ranges = (ALL_STATUSES,)
    else:
        ranges = tuple(sorted({(s, s) for s in retry_statuses}))
    return Selection(chosen - {ErrorKind.HTTP_STATUS}, ranges)
