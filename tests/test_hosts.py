"""The per-host scheduler, as pure logic on a fake clock: limits, rates, pauses, AIMD."""

from __future__ import annotations

from dataclasses import dataclass

from crawler.hosts import HostLimit, HostScheduler, host_of


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
    s = HostScheduler(initial=1, maximum=1, adaptive=False, max_idle_hosts=10)
    for i in range(50):
        s.put(Item(f"http://h{i}/"))
        s.done(drain(s)[0], error_kind=None, status=200, elapsed=0.01)
    assert len(s.hosts) <= 11


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
    s.put(Item("http://h/0"))
    (item,) = drain(s)
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
