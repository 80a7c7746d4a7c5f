"""Per-host politeness for one worker: how many requests a host may have in flight and how
often a new one may start, adapted to how the host answers (AIMD with slow start).

Items wait here, per host, until their host has room; only then do they reach the fetch pool, so
a slow or failing host never holds more fetch slots than its limit. Pure scheduling: no I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crawler.kinds import ANSWERED_KINDS, OVERLOAD_KINDS

OVERLOAD_STATUSES = frozenset({429, 503})


def host_of(url: str) -> str:
    """The scheme, host and port of a URL as crawler.urls.parse_url makes it:
    'https://example.com:8443'. Userinfo is left out: one host's budget, whoever logs in."""
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority.rpartition('@')[2] if '@' in authority else authority}"


@dataclass(slots=True)
class HostLimit:
    """AIMD: grow by one per answered request while in slow start (doubling per round trip),
    then by one per window; halve on an overload signal, at most once per round trip."""

    limit: float
    minimum: float = 1.0
    maximum: float = 1000.0
    adaptive: bool = True
    slow_start: bool = True
    last_decrease: float = 0.0

    def on_success(self) -> None:
        if not self.adaptive:
            return
        step = 1.0 if self.slow_start else 1.0 / max(self.limit, 1.0)
        self.limit = min(self.maximum, self.limit + step)

    def on_overload(self, now: float, rtt: float) -> None:
        if not self.adaptive or now - self.last_decrease < max(rtt, 0.05):
            return  # the answers of one window are one signal, not many
        self.slow_start = False
        self.last_decrease = now
        self.limit = max(self.minimum, self.limit / 2)


@dataclass(slots=True)
class HostState:
    limit: HostLimit
    pending: deque = field(default_factory=deque)
    active: int = 0  # dispatched to the fetch pool or in flight
    next_start: float = 0.0  # rate limit and Retry-After pauses
    timer: asyncio.TimerHandle | None = None
    rtt: float = 0.1
    delay: float = 0.0  # seconds between starts that the host itself asked for (robots.txt Crawl-delay)
    idle: bool = False  # kept while idle, and counted so (HostScheduler._idle)
    busiest: int = 0  # the most requests it has had in flight at once


class HostScheduler:
    """put() items; fetch tasks take them from `ready`; done() reports each answer."""

    def __init__(
        self,
        *,
        initial: int,
        maximum: int,
        rate: float = 0.0,
        adaptive: bool = True,
        key: Callable[[Any], str] = lambda item: host_of(item.url),
        clock: Callable[[], float] = time.monotonic,
        max_idle_hosts: int = 10_000,
        on_idle: Callable[[str], None] | None = None,
    ) -> None:
        self.initial = max(1, initial)
        self.maximum = max(self.initial, maximum)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.adaptive = adaptive
        self.key = key
        self.clock = clock
        self.ready: asyncio.Queue = asyncio.Queue()
        self.hosts: OrderedDict[str, HostState] = OrderedDict()
        self.max_idle_hosts = max_idle_hosts
        self._idle_hosts = 0  # hosts kept while idle
        # Called with a host the moment it has nothing pending, in flight or paused: the fetcher
        # closes its idle connections then (crawler/fetch/connections.py says why).
        self.on_idle = on_idle

    def _state(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState(
                HostLimit(float(self.initial), maximum=float(self.maximum), adaptive=self.adaptive)
            )
        return state

    def put(self, item: Any) -> None:
        host = self.key(item)
        state = self._state(host)
        if state.idle:
            state.idle = False
            self._idle_hosts -= 1
        state.pending.append(item)
        self._pump(host, state)

    def done(
        self, item: Any, *, error_kind: str | None, status: int | None, elapsed: float, pause: float = 0.0
    ) -> None:
        """An attempt at `item` ended; `pause` (seconds, e.g. a Retry-After) holds the host back."""
        host = self.key(item)
        state = self.hosts[host]  # kept while it has an item out (active > 0)
        state.rtt = 0.8 * state.rtt + 0.2 * max(elapsed, 0.001)
        if error_kind in OVERLOAD_KINDS or status in OVERLOAD_STATUSES:
            state.limit.on_overload(self.clock(), state.rtt)
        elif error_kind in ANSWERED_KINDS:
            state.limit.on_success()
        if pause > 0:
            state.next_start = max(state.next_start, self.clock() + pause)
        self._release(host, state)

    def cancel(self, item: Any) -> None:
        """An item taken from `ready` that will not be fetched after all (its chunk was lost)."""
        host = self.key(item)
        self._release(host, self._state(host))

    def _release(self, host: str, state: HostState) -> None:
        state.active -= 1
        self._pump(host, state)
        if not state.pending and state.active == 0 and state.timer is None:
            self._idle(host)
            if self.on_idle is not None:
                self.on_idle(host)

    def _idle(self, host: str) -> None:
        """Forget an idle host that learnt nothing a fresh start would not relearn; keep what was
        learnt of others (an overload's lower limit, a pause, a crawl delay), but only so many:
        memory is per host with work, not per host ever seen."""
        state = self.hosts[host]
        if (
            state.busiest <= self.initial
            and state.limit.slow_start
            and not state.delay
            and (not state.next_start or state.next_start <= self.clock())
        ):
            # Never overloaded, nothing to wait out, never more in flight than a fresh start
            # allows: met again, it starts from `initial` as it would have gone on. A crawl over
            # 100 000 hosts kept 10 000 such states per worker, about 1 KiB each (their deque).
            # A host that was busier keeps the limit it grew to while it is remembered.
            del self.hosts[host]
            if state.idle:  # kept for a crawl delay that is now 0
                self._idle_hosts -= 1
            return
        self.hosts.move_to_end(host)
        if state.idle:
            return  # counted already (paced, then idle again)
        state.idle = True
        self._idle_hosts += 1
        while self._idle_hosts > self.max_idle_hosts:
            oldest, state = next(iter(self.hosts.items()))
            if not state.idle:
                self.hosts.move_to_end(oldest)  # busy: its turn comes when it is idle
                continue
            del self.hosts[oldest]
            self._idle_hosts -= 1

    def clear(self) -> int:
        """Drop every item not yet started (a drain); return how many."""
        dropped = self.ready.qsize()
        while not self.ready.empty():
            self.ready.get_nowait()
        for state in self.hosts.values():
            dropped += len(state.pending)
            state.pending.clear()
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
        return dropped

    def rescale(self, *, initial: int, maximum: int, rate: float) -> None:
        """New per-host bounds, e.g. when workers join or leave the job: hosts already known keep
        what they learnt, within the new maximum (a fixed limit takes the new value)."""
        self.initial = max(1, initial)
        self.maximum = max(self.initial, maximum)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        for host, state in self.hosts.items():
            limit = state.limit
            limit.maximum = float(self.maximum)
            limit.limit = min(limit.limit, limit.maximum) if self.adaptive else float(self.initial)
            self._pump(host, state)

    def pace(self, host: str, delay: float, *, hold: bool = False) -> None:
        """Start this host's requests at least `delay` seconds apart (a robots.txt Crawl-delay):
        the longer of it and the rate's interval. With `hold`, the next start waits that long
        (a request to the host was just made: its robots.txt)."""
        state = self._state(host)
        state.delay = delay
        now = self.clock()
        # next_start set, even to now, sends every start of this host past the clock in _pump,
        # where the delay is read: hosts without one never read it.
        state.next_start = max(state.next_start, now + max(delay, self.interval) if hold else now)
        self._pump(host, state)
        if not state.pending and state.active == 0 and state.timer is None:
            self._idle(host)

    def limit_of(self, host: str) -> float | None:
        state = self.hosts.get(host)
        return state.limit.limit if state else None

    def _pump(self, host: str, state: HostState) -> None:
        """Move this host's items to the fetch pool while it has room and may start one."""
        while state.pending and state.active < int(state.limit.limit):
            if state.next_start or self.interval:  # the clock is read only for a rate or a pause
                now = self.clock()
                if now < state.next_start:
                    if state.timer is None:
                        loop = asyncio.get_running_loop()
                        state.timer = loop.call_later(state.next_start - now, self._wake, host)
                    return
                if self.interval or state.delay:
                    state.next_start = max(state.next_start, now) + max(self.interval, state.delay)
            state.active += 1
            if state.active > state.busiest:
                state.busiest = state.active
            self.ready.put_nowait(state.pending.popleft())

    def _wake(self, host: str) -> None:
        state = self.hosts.get(host)
        if state is not None:
            state.timer = None
            self._pump(host, state)
