"""HostScheduler under any sequence of puts, starts, answers, cancels, pauses and clock steps:
a host never has more requests dispatched than its limit allowed when they were dispatched, and
every item put comes out exactly once (or is counted as dropped by a drain)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crawler.fetch.hosts import HostScheduler

pytestmark = pytest.mark.one_server

HOSTS = ["http://a.test", "http://b.test", "http://c.test"]


@dataclass(eq=False)  # identity, not value: two items may name the same URL
class Item:
    url: str
    n: int


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    scheduler: HostScheduler
    clock: Clock
    put: list[Item] = field(default_factory=list)
    started: list[Item] = field(default_factory=list)  # taken from `ready`, not answered yet
    out: list[Item] = field(default_factory=list)  # every item taken from `ready`
    dropped: int = 0

    def take(self, count: int) -> None:
        for _ in range(count):
            if self.scheduler.ready.empty():
                return
            item = self.scheduler.ready.get_nowait()
            self.started.append(item)
            self.out.append(item)

    def dispatched(self, host: str) -> int:
        """Items of this host the scheduler let out and that are not answered: started or waiting in `ready`."""
        waiting = sum(1 for i in self.scheduler.ready._queue if i.url.startswith(host))  # noqa: SLF001
        return waiting + sum(1 for i in self.started if i.url.startswith(host))

    def wake_all(self) -> None:
        for host in list(self.scheduler.hosts):
            self.scheduler._wake(host)  # the timer's callback, run at the fake clock's time  # noqa: SLF001


OUTCOMES = st.sampled_from(
    [
        dict(error_kind=None, status=200),
        dict(error_kind="http_status", status=404),
        dict(error_kind="http_status", status=503),
        dict(error_kind="timeout", status=None),
        dict(error_kind="connect", status=None),
        dict(error_kind="dns", status=None),
    ]
)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(HOSTS), st.integers(1, 6)),
        st.tuples(st.just("take"), st.integers(1, 8)),
        st.tuples(st.just("pace"), st.sampled_from(HOSTS), st.sampled_from([0.0, 1.0]), st.booleans()),
        st.tuples(st.just("answer"), st.integers(0, 20), OUTCOMES, st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.sampled_from([0.1, 0.5, 3.0])),
        st.tuples(st.just("rescale"), st.integers(1, 4), st.integers(1, 8)),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


def play(steps: list[tuple], *, adaptive: bool, rate: float, max_idle_hosts: int) -> None:
    async def main() -> None:
        clock = Clock()
        run = Run(
            HostScheduler(
                initial=2, maximum=6, rate=rate, adaptive=adaptive, clock=clock, max_idle_hosts=max_idle_hosts
            ),
            clock,
        )
        n = 0
        for step in steps:
            before = {h: run.dispatched(h) for h in HOSTS}
            if step[0] == "put":
                for _ in range(step[2]):
                    item = Item(f"{step[1]}/{n}", n)
                    n += 1
                    run.put.append(item)
                    run.scheduler.put(item)
            elif step[0] == "take":
                run.take(step[1])
            elif step[0] == "pace":  # a robots.txt Crawl-delay (hold: its fetch was just made)
                run.scheduler.pace(step[1], step[2], hold=step[3])
            elif step[0] == "answer" and run.started:
                item = run.started.pop(step[1] % len(run.started))
                run.scheduler.done(item, elapsed=0.05, pause=step[3], **step[2])
            elif step[0] == "cancel" and run.started:
                run.scheduler.cancel(run.started.pop(step[1] % len(run.started)))
            elif step[0] == "tick":
                clock.now += step[1]
                run.wake_all()
            elif step[0] == "rescale":
                run.scheduler.rescale(initial=step[1], maximum=step[1] + step[2], rate=rate)
            elif step[0] == "clear":  # a drain: the worker stops using the scheduler after it
                run.dropped += run.scheduler.clear()
                break
            # Idle hosts are kept to the bound, and counted exactly.
            idle = sum(state.idle for state in run.scheduler.hosts.values())
            assert idle == run.scheduler._idle_hosts <= max_idle_hosts, (idle, run.scheduler._idle_hosts, step)
            for host in HOSTS:
                now = run.dispatched(host)
                limit = run.scheduler.limit_of(host)
                if now > before[host]:  # this step let some out: within the limit it had then
                    assert limit is not None and now <= int(limit), (host, now, limit, step)
        # The end: answer everything, let time pass; every item put was dispatched once, or dropped.
        for _ in range(0 if run.dropped else 1000):
            run.take(10_000)
            while run.started:
                run.scheduler.done(run.started.pop(), error_kind=None, status=200, elapsed=0.05)
            clock.now += 5.0
            run.wake_all()
            if run.scheduler.ready.empty() and not any(s.pending for s in run.scheduler.hosts.values()):
                break
        assert len(run.out) == len({id(i) for i in run.out})  # none twice
        assert {id(i) for i in run.out} <= {id(i) for i in run.put}
        assert len(run.put) - len(run.out) == run.dropped  # none lost but those a drain dropped
        for state in run.scheduler.hosts.values():
            assert run.dropped or state.active == 0
            if state.timer is not None:
                state.timer.cancel()

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(STEPS, st.booleans(), st.sampled_from([0.0, 0.0, 4.0]), st.sampled_from([1, 2, 10_000]))
# A cancelled start gives its slot back; a pause holds the host until the clock passes it; a host
# kept idle for its crawl delay is forgotten, and uncounted, once the delay is 0.
@example([("pace", HOSTS[0], 1.0, False), ("pace", HOSTS[0], 0.0, False)], True, 0.0, 10_000)
@example([("put", HOSTS[0], 4), ("take", 2), ("cancel", 0), ("cancel", 0), ("take", 2)], False, 0.0, 1)
@example(
    [
        ("put", HOSTS[1], 3),
        ("take", 1),
        ("answer", 0, dict(error_kind="http_status", status=503), 2.0),
        ("take", 3),
        ("tick", 0.5),
        ("take", 3),
        ("tick", 3.0),
        ("take", 3),
    ],
    True,
    0.0,
    2,
)
def test_no_host_exceeds_its_limit_and_nothing_is_lost_or_duplicated(steps, adaptive, rate, max_idle_hosts):
    play(steps, adaptive=adaptive, rate=rate, max_idle_hosts=max_idle_hosts)
