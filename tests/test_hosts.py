"""The per-host scheduler, as pure logic on a fake clock: limits, rates, pauses, AIMD."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from crawler.fetch.hosts import HostLimit, HostScheduler, host_of

pytestmark = pytest.mark.one_server


@dataclass
class Item:
    url: str


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(scheduler: HostScheduler) -> list[Item]:
    out = []
    while not scheduler.ready.empty():
        out.append(scheduler.ready.get_nowait())
    return out


def test_host_of_keeps_scheme_host_and_port():
    assert host_of("https://a.example:8443/x?y") == "https://a.example:8443"
    assert host_of("http://b.example/") == "http://b.example"


def test_host_of_leaves_userinfo_out():
    # one budget per host whoever logs in, and no password in a key that may be shown
    assert host_of("http://alice:pw@b.example:81/x@y") == "http://b.example:81"


async def test_a_host_gets_no_more_than_its_limit_and_others_are_not_held_up():
    s = HostScheduler(initial=2, maximum=2, adaptive=False)
    for i in range(5):
        s.put(Item(f"http://slow/{i}"))
    s.put(Item("http://fast/1"))
    dispatched = drain(s)
    assert [i.url for i in dispatched] == ["http://slow/0", "http://slow/1", "http://fast/1"]
    s.done(dispatched[0], error_kind=None, status=200, elapsed=0.1)
    assert [i.url for i in drain(s)] == ["http://slow/2"]


async def test_a_rate_limit_spaces_starts_with_a_timer():
    clock = Clock()
    s = HostScheduler(initial=10, maximum=10, rate=2.0, adaptive=False, clock=clock)
    for i in range(3):
        s.put(Item(f"http://h/{i}"))
    assert len(drain(s)) == 1  # the next may start half a second later
    clock.now += 0.5
    s._wake("http://h")
    assert len(drain(s)) == 1


async def test_retry_after_pauses_the_host():
    clock = Clock()
    s = HostScheduler(initial=4, maximum=4, adaptive=False, clock=clock)
    s.put(Item("http://h/0"))
    first = drain(s)[0]
    s.done(first, error_kind="http_status", status=503, elapsed=0.01, pause=5.0)
    s.put(Item("http://h/1"))
    assert drain(s) == []  # paused
    clock.now += 5.0
    s._wake("http://h")
    assert len(drain(s)) == 1


def test_aimd_slow_start_then_halving_then_additive_growth():
    limit = HostLimit(4.0, maximum=100.0)
    for _ in range(4):
        limit.on_success()
    assert limit.limit == 8.0  # slow start: +1 per answer, doubling per round trip
    limit.on_overload(now=10.0, rtt=0.1)
    assert limit.limit == 4.0 and not limit.slow_start
    limit.on_overload(now=10.05, rtt=0.1)  # same round trip: one signal, not two
    assert limit.limit == 4.0
    for _ in range(4):
        limit.on_success()
    assert 4.9 < limit.limit < 5.1  # +1 per window of `limit` answers
    for _ in range(20):
        limit.on_overload(now=limit.last_decrease + 1.0, rtt=0.1)
    assert limit.limit == 1.0  # never below one


async def test_overload_answers_shrink_the_host_limit_and_good_ones_grow_it():
    clock = Clock()
    s = HostScheduler(initial=8, maximum=64, clock=clock)
    for i in range(8):
        s.put(Item(f"http://h/{i}"))
    items = drain(s)
    clock.now += 1
    s.done(items[0], error_kind="http_status", status=429, elapsed=0.1)
    assert s.limit_of("http://h") == 4.0
    for item in items[1:]:
        clock.now += 1
        s.done(item, error_kind=None, status=200, elapsed=0.1)
    assert s.limit_of("http://h") > 4.0


async def test_clear_drops_what_has_not_started():
    s = HostScheduler(initial=1, maximum=1, adaptive=False)
    for i in range(4):
        s.put(Item(f"http://h/{i}"))
    assert s.clear() == 4  # one dispatched but not taken, three pending
    assert s.ready.empty()


async def test_idle_hosts_are_forgotten_beyond_a_bound():
    s = HostScheduler(initial=1, maximum=1, max_idle_hosts=10)
    for i in range(50):
        s.put(Item(f"http://h{i}/"))
        s.done(drain(s)[0], error_kind=None, status=503, elapsed=0.01)  # overloaded: worth remembering
    assert len(s.hosts) <= 11


@pytest.mark.parametrize("adaptive", [True, False])
async def test_a_host_that_learnt_nothing_is_forgotten_once_it_has_nothing_pending(adaptive):
    """Per-host state follows the work in flight: a crawl over many hosts that answer keeps none
    of them once they are done, however many it met."""
    s = HostScheduler(initial=2, maximum=8, adaptive=adaptive)
    for i in range(1000):
        for j in range(3):
            s.put(Item(f"http://h{i}/{j}"))
    assert len(s.hosts) == 1000
    while items := drain(s):
        for item in items:
            s.done(
                item,
                error_kind=None if item.url.endswith("/0") else "http_status",
                status=200 if item.url.endswith("/0") else 404,
                elapsed=0.01,
            )
    assert len(s.hosts) == 0
    s.put(Item("http://h7/again"))  # met again: a fresh start, at `initial`
    assert s.limit_of("http://h7") == 2.0


async def test_a_host_that_learnt_something_is_kept_while_idle():
    clock = Clock()
    s = HostScheduler(initial=4, maximum=8, clock=clock)
    for name in ("overloaded", "paused", "paced", "fine"):
        s.put(Item(f"http://{name}/"))
    s.pace("http://paced", 2.0)
    answers = {
        "http://overloaded/": dict(status=503),
        "http://paused/": dict(status=200, pause=30.0),
        "http://paced/": dict(status=200),
        "http://fine/": dict(status=200),
    }
    for item in drain(s):
        s.done(item, error_kind=None, elapsed=0.01, **answers[item.url])
    assert sorted(s.hosts) == ["http://overloaded", "http://paced", "http://paused"]
    assert s.limit_of("http://overloaded") == 2.0
    for i in range(6):  # more in flight at once than a fresh start allows: its grown limit is kept
        s.put(Item(f"http://busy/{i}"))
    for item in drain(s):
        s.done(item, error_kind=None, status=200, elapsed=0.01)
    while items := drain(s):
        for item in items:
            s.done(item, error_kind=None, status=200, elapsed=0.01)
    assert s.limit_of("http://busy") == 8.0  # grown from 4 to the maximum, one per answer
    s.hosts["http://paused"].timer = None  # (no timer was armed: nothing was pending)


async def test_rescale_shares_a_fixed_budget_when_workers_join_and_leave():
    s = HostScheduler(initial=6, maximum=6, adaptive=False)
    for i in range(10):
        s.put(Item(f"http://h/{i}"))
    first = drain(s)
    assert len(first) == 6
    s.rescale(initial=2, maximum=2, rate=0.0)  # two more workers joined: a third each
    for item in first[:4]:
        s.done(item, error_kind=None, status=200, elapsed=0.01)
    assert drain(s) == []  # two still in flight: the host has its share
    s.done(first[4], error_kind=None, status=200, elapsed=0.01)
    assert len(drain(s)) == 1
    s.rescale(initial=6, maximum=6, rate=0.0)  # they left: the whole budget again, at once
    assert len(drain(s)) == 3  # 4 pending, up to 6 in flight with the 2 still out
    assert s.limit_of("http://h") == 6


async def test_rescale_keeps_what_an_adaptive_host_learnt_within_the_new_maximum():
    s = HostScheduler(initial=2, maximum=40, adaptive=True)
    s.put(Item("http://h/held"))  # in flight throughout: the host stays busy, its state kept
    s.put(Item("http://h/0"))
    _, item = drain(s)
    for _ in range(20):
        s.done(item, error_kind=None, status=200, elapsed=0.01)
        s.put(item)
        (item,) = drain(s)
    assert s.limit_of("http://h") == 22
    s.rescale(initial=1, maximum=10, rate=0.0)
    assert s.limit_of("http://h") == 10
    s.rescale(initial=2, maximum=40, rate=0.0)
    assert s.limit_of("http://h") == 10  # room to grow again, not a jump


async def test_a_cancelled_item_frees_its_hosts_slot():
    s = HostScheduler(initial=1, maximum=1, adaptive=False)
    s.put(Item("http://h/0"))
    s.put(Item("http://h/1"))
    (first,) = drain(s)
    s.cancel(first)  # its chunk was lost: not fetched, and no answer to learn from
    assert [i.url for i in drain(s)] == ["http://h/1"]
    assert s.limit_of("http://h") == 1


async def test_a_host_is_reported_idle_once_nothing_is_pending_in_flight_or_paused():
    idle: list[str] = []
    clock = Clock()
    s = HostScheduler(initial=1, maximum=1, adaptive=False, clock=clock, on_idle=idle.append)
    s.put(Item("http://a/1"))
    s.put(Item("http://a/2"))
    first = drain(s)
    s.done(first[0], error_kind=None, status=200, elapsed=0.1)
    assert idle == []  # a/2 is next
    second = drain(s)
    s.put(Item("http://b/1"))
    s.done(second[0], error_kind=None, status=503, elapsed=0.1, pause=5.0)
    assert idle == ["http://a"]  # nothing more for a; its pause is remembered, not waited out
    s.put(Item("http://b/2"))
    (b1,) = drain(s)
    s.done(b1, error_kind=None, status=503, elapsed=0.1, pause=5.0)
    assert idle == ["http://a"]  # b/2 waits out b's pause: b is not idle
    clock.now += 5.0
    s._wake("http://b")
    (b2,) = drain(s)
    s.cancel(b2)
    assert idle == ["http://a", "http://b"]


# --- exact behaviour: each rule of the scheduler, one at a time -----------------------------------


def test_host_of_stops_at_the_first_slash_after_the_authority():
    assert host_of("http://a.test/x/y/z") == "http://a.test"
    assert host_of("http://a.test/login?next=https://b.test/x") == "http://a.test"  # a URL in the query


def test_the_overload_window_is_the_round_trip_and_its_end_counts_again():
    limit = HostLimit(16.0, maximum=100.0)
    limit.on_overload(now=8.0, rtt=0.5)
    assert limit.limit == 8.0
    limit.on_overload(now=8.25, rtt=0.5)  # inside the round trip: the same signal
    assert limit.limit == 8.0
    limit.on_overload(now=8.5, rtt=0.5)  # a full round trip later: a new one
    assert limit.limit == 4.0
    limit.on_overload(now=8.53, rtt=0.01)  # a tiny round trip is read as 50 ms
    assert limit.limit == 4.0


def test_congestion_avoidance_at_a_limit_of_one_grows_by_one():
    limit = HostLimit(1.0, maximum=10.0, slow_start=False)
    limit.on_success()
    assert limit.limit == 2.0  # one window of one answer
    limit.on_success()
    assert limit.limit == 2.5


async def test_a_rate_below_one_per_second_spaces_starts_by_its_inverse():
    clock = Clock()
    s = HostScheduler(initial=5, maximum=5, rate=0.5, adaptive=False, clock=clock)
    assert s.interval == 2.0
    for i in range(2):
        s.put(Item(f"http://h/{i}"))
    assert len(drain(s)) == 1
    clock.now += 1.9
    s._wake("http://h")
    assert drain(s) == []
    clock.now += 0.1
    s._wake("http://h")
    assert len(drain(s)) == 1
    for state in s.hosts.values():
        if state.timer is not None:
            state.timer.cancel()


async def test_by_default_ten_thousand_idle_hosts_are_remembered():
    s = HostScheduler(initial=1, maximum=1)
    for i in range(10_001):
        s.put(Item(f"http://h{i}/"))
        s.done(drain(s)[0], error_kind=None, status=503, elapsed=0.01)
    assert len(s.hosts) == 10_000 and "http://h0" not in s.hosts and "http://h1" in s.hosts


async def test_the_idle_bound_keeps_exactly_the_latest_and_every_busy_host():
    s = HostScheduler(initial=1, maximum=1, max_idle_hosts=2)
    s.put(Item("http://busy/"))
    (busy,) = drain(s)  # in flight the whole time: never forgotten
    for name in ("b", "c"):  # each overloaded: worth remembering while idle
        s.put(Item(f"http://{name}/"))
        s.done(drain(s)[0], error_kind=None, status=503, elapsed=0.01)
    assert list(s.hosts) == ["http://busy", "http://b", "http://c"]  # two idle: both kept
    for name in ("d", "e"):
        s.put(Item(f"http://{name}/"))
        s.done(drain(s)[0], error_kind=None, status=503, elapsed=0.01)
    assert sorted(s.hosts) == ["http://busy", "http://d", "http://e"]  # the two latest idle, and the busy one
    s.done(busy, error_kind=None, status=503, elapsed=0.01)  # its state was kept: the answer lands
    for name in ("f", "g", "h"):
        s.put(Item(f"http://{name}/"))
        s.done(drain(s)[0], error_kind=None, status=503, elapsed=0.01)
    assert list(s.hosts)[-2:] == ["http://g", "http://h"] and len(s.hosts) <= 3  # the latest, bounded


async def test_a_cancel_that_leaves_a_host_idle_forgets_it_like_an_answer():
    s = HostScheduler(initial=1, maximum=1, adaptive=False, max_idle_hosts=1)
    s.put(Item("http://a/"))
    s.cancel(drain(s)[0])
    assert list(s.hosts) == []  # nothing learnt: forgotten at once
    s.pace("http://b", 1.0)  # a crawl delay is worth remembering, within the bound
    s.put(Item("http://b/"))
    s.cancel(drain(s)[0])
    s.pace("http://c", 1.0)
    assert list(s.hosts) == ["http://c"]  # one idle host kept: the latest
    s.put(Item("http://b/again"))
    assert len(drain(s)) == 1  # its slot was given back


async def test_adaptive_growth_stops_at_the_schedulers_maximum_and_a_fixed_limit_never_grows():
    for adaptive, expected in ((True, 3.0), (False, 2.0)):
        s = HostScheduler(initial=2, maximum=3, adaptive=adaptive)
        s.put(Item("http://h/held"))  # in flight throughout: the host stays busy, its state kept
        drain(s)
        for i in range(10):
            s.put(Item(f"http://h/{i}"))
            for item in drain(s):
                s.done(item, error_kind=None, status=200, elapsed=0.01)
        assert s.limit_of("http://h") == expected


async def test_what_counts_as_an_answer_and_what_as_overload():
    clock = Clock()
    s = HostScheduler(initial=4, maximum=100, clock=clock)
    for i in range(3):
        s.put(Item(f"http://h/{i}"))
    a, b, c = drain(s)
    s.done(a, error_kind="http_status", status=404, elapsed=0.01)  # an answer: slow start grows
    assert s.limit_of("http://h") == 5.0
    s.done(b, error_kind="dns", status=None, elapsed=0.01)  # no answer, no overload: no change
    assert s.limit_of("http://h") == 5.0
    clock.now += 1
    s.done(c, error_kind="timeout", status=None, elapsed=0.01)  # overload: halved
    assert s.limit_of("http://h") == 2.5


async def test_the_round_trip_estimate_is_a_moving_average_of_answer_times():
    s = HostScheduler(initial=4, maximum=4)
    for i in range(3):
        s.put(Item(f"http://h/{i}"))
    a, b, _ = drain(s)  # the third in flight throughout: the host stays busy, its state kept
    s.done(a, error_kind=None, status=200, elapsed=0.5)
    assert s.hosts["http://h"].rtt == pytest.approx(0.8 * 0.1 + 0.2 * 0.5)
    s.done(b, error_kind=None, status=200, elapsed=0.0)  # counted as 1 ms, never zero
    assert s.hosts["http://h"].rtt == pytest.approx(0.8 * (0.8 * 0.1 + 0.2 * 0.5) + 0.2 * 0.001)


async def test_a_pause_of_half_a_second_holds_the_host():
    clock = Clock()
    s = HostScheduler(initial=4, maximum=4, adaptive=False, clock=clock)
    s.put(Item("http://h/0"))
    s.done(drain(s)[0], error_kind="http_status", status=429, elapsed=0.01, pause=0.5)
    s.put(Item("http://h/1"))
    assert drain(s) == []
    clock.now += 0.5
    s._wake("http://h")
    assert len(drain(s)) == 1


async def test_timers_wake_a_rate_limited_or_paused_host_in_real_time():
    s = HostScheduler(initial=4, maximum=4, rate=50.0, adaptive=False)  # real clock: 20 ms apart
    for i in range(4):
        s.put(Item(f"http://h/{i}"))
    got = [await asyncio.wait_for(s.ready.get(), 5) for _ in range(4)]
    assert [i.url for i in got] == [f"http://h/{i}" for i in range(4)]
    paused = HostScheduler(initial=4, maximum=4, adaptive=False)
    paused.put(Item("http://p/0"))
    paused.done(await paused.ready.get(), error_kind="http_status", status=503, elapsed=0.01, pause=0.05)
    paused.put(Item("http://p/1"))
    assert (await asyncio.wait_for(paused.ready.get(), 5)).url == "http://p/1"


async def test_rescale_sets_the_rate_and_a_limit_of_at_least_one():
    s = HostScheduler(initial=4, maximum=4, adaptive=False)
    s.rescale(initial=4, maximum=4, rate=0.5)
    assert s.interval == 2.0
    s.rescale(initial=4, maximum=4, rate=4.0)
    assert s.interval == 0.25
    s.rescale(initial=0, maximum=0, rate=0.0)
    assert (s.initial, s.maximum, s.interval) == (1, 1, 0.0)


async def test_a_slot_freed_by_an_answer_or_a_rescale_wakes_a_rate_limited_host_in_real_time():
    s = HostScheduler(initial=1, maximum=1, rate=50.0, adaptive=False)
    for i in range(2):
        s.put(Item(f"http://h/{i}"))
    first = await asyncio.wait_for(s.ready.get(), 5)
    s.done(first, error_kind=None, status=200, elapsed=0.01)  # the next start is 20 ms away: a timer
    assert (await asyncio.wait_for(s.ready.get(), 5)).url == "http://h/1"
    r = HostScheduler(initial=1, maximum=1, rate=50.0, adaptive=False)
    for i in range(3):
        r.put(Item(f"http://r/{i}"))
    await asyncio.wait_for(r.ready.get(), 5)
    r.rescale(initial=3, maximum=3, rate=50.0)  # room for the other two, each after its interval
    got = [await asyncio.wait_for(r.ready.get(), 5) for _ in range(2)]
    assert [i.url for i in got] == ["http://r/1", "http://r/2"]
