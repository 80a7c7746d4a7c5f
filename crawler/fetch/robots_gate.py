"""The worker's side of robots.txt (--robots obey): a row waits at the gate until its host's rules
are known, then goes on to the per-host scheduler or ends as a `robots` failure.

Once per host per job, on every machine: the ledger's `robots` table holds, per job and host,
first a claim and then the decision. The first worker that needs a host's rules claims the host
(an INSERT that only one worker wins) and fetches its robots.txt; every other worker that needs
them meanwhile holds that host's rows and looks in the ledger every ROBOTS_POLL seconds until the
decision is there. A claim is renewed with the worker's heartbeat; one whose worker stopped
beating (killed, frozen, cut off) or let it expire is taken over by the next worker that asks, so
a kill -9 costs at most the fetches under way, and a resume finds every decided host decided.

Memory: a bounded LRU of parsed rules (RULES_BUDGET bytes, as RobotsRules.weight estimates them);
the ledger holds the rest, and a host that left the LRU is read back from it, not fetched again.
Rows held at the gate are rows the worker leased, so they are bounded like any.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from crawler.fetch.fetcher import Fetcher
from crawler.fetch.retry import RetryPolicy, backoff
from crawler.fetch.robots import (
    BODY_LIMIT,
    MAX_REDIRECTS,
    RobotsOutcome,
    RobotsRules,
    RobotsVerdict,
    describe_failure,
    outcome_of,
    product_token,
    robots_url,
    unreachable,
)
from crawler.ledger import registry
from crawler.ledger.database import LedgerConnection
from crawler.ledger.robots_claims import RobotsRecord, claim_robots, decide_robots, release_robots_claims
from crawler.settings import Settings

if TYPE_CHECKING:
    from crawler.fetch.worker_ledger import WorkerLedger

log = logging.getLogger(__name__)

ROBOTS_POLL = 0.2  # seconds between looks in the ledger for a decision another worker is making
# Parsed rules kept per worker: about 16 000 hosts of a few lines each, or four 500 KiB files.
RULES_BUDGET = 32 * 1024 * 1024
# Protego parses a 500 KiB file of 25 000 rules in 0.34 s (a few lines: 50 us): a file this long
# is parsed in a thread, so the worker's loop goes on serving its other hosts meanwhile.
PARSE_ASIDE = 64 * 1024


class RobotsGate:
    """`admit(items)` for each leased chunk; `run(fetcher)` fetches claimed hosts' robots.txt
    until `close()`. `release(item)` lets an item go on to be fetched; `refuse(item, reason)`
    ends it as a `robots` failure; `pace(host, delay, hold)` sets a host's Crawl-delay;
    `fetching(+1/-1)` counts robots.txt requests in flight among the worker's."""

    def __init__(
        self,
        dsn: str,
        job_id: int,
        owner: str,
        settings: Settings,
        policy: RetryPolicy,
        *,
        release: Callable[[Any], None],
        refuse: Callable[[Any, str], Awaitable[None]],
        pace: Callable[[str, float, bool], None],
        fetching: Callable[[int], None] = lambda change: None,
    ) -> None:
        self.job_id = job_id
        self.owner = owner
        self.settings = settings
        self.policy = policy
        self.release, self.refuse, self.pace, self.fetching = release, refuse, pace, fetching
        self.token = product_token(settings.user_agent)
        self.db = LedgerConnection(dsn, outage_limit=settings.db_outage_limit, job=job_id)
        self._db_lock = asyncio.Lock()  # one connection, used by the feed, the fetches and the poll
        self.rules: OrderedDict[str, RobotsRules] = OrderedDict()
        self._weight = 0
        self.waiting: dict[str, list] = {}  # host -> items held until its rules are known
        self.claimed: set[str] = set()  # hosts whose robots.txt this worker fetches
        self.awaited: set[str] = set()  # hosts whose robots.txt another worker fetches
        self._attempts: dict[str, int] = {}
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._timers: set[asyncio.TimerHandle] = set()
        self._awaiting = asyncio.Event()
        self._closed = False
        self._rng = random.Random()
        self.fetches = 0  # robots.txt requests this worker made
        # A claim lasts as a chunk's lease does, renewed with the heartbeat; a worker is presumed
        # gone after the registry's missed beats.
        self._claim_seconds = settings.lease_seconds
        self._live_seconds = registry.LIVE_BEATS * settings.heartbeat_seconds

    async def _ledger(self, fn, *args, **kwargs):
        async with self._db_lock:
            return await self.db.run(fn, self.job_id, *args, **kwargs)

    # --- rows in ---------------------------------------------------------------------------

    async def admit(self, items: list) -> None:
        """Each item goes on, ends as refused, or waits here for its host's rules."""
        asked: list[str] = []
        paced: set[str] = set()
        for item in items:
            host = item.host
            rules = self.rules.get(host)
            if rules is None:
                held = self.waiting.get(host)
                if held is None:
                    held = self.waiting[host] = []
                    if host not in self.claimed and host not in self.awaited:
                        asked.append(host)
                held.append(item)
                continue
            self.rules.move_to_end(host)
            if rules.delay and host not in paced:  # the scheduler may have forgotten an idle host
                paced.add(host)
                self.pace(host, rules.delay, False)
            await self._pass(item, rules)
        if asked:
            await self._ask(asked)

    async def _ask(self, hosts: list[str]) -> None:
        claims = await self._ledger(
            claim_robots,
            hosts,
            self.owner,
            claim_seconds=self._claim_seconds,
            live_seconds=self._live_seconds,
            reuse_ttl=0.0 if self.settings.no_cache else self.settings.cache_ttl,
        )
        for host in claims.claimed:
            self.awaited.discard(host)
            self.claimed.add(host)
            self._queue.put_nowait(host)
        for host, record in claims.decided.items():
            self.awaited.discard(host)
            await self._decided(host, record, fetched=False)
        for host in hosts:
            if host not in self.claimed and host in self.waiting:
                self.awaited.add(host)
        if self.awaited:
            self._awaiting.set()

    async def _pass(self, item, rules: RobotsRules) -> None:
        reason = rules.refusal(item.url)
        if reason is None:
            self.release(item)
        else:
            await self.refuse(item, reason)

    async def _decided(self, host: str, record: RobotsRecord, *, fetched: bool) -> None:
        outcome = RobotsOutcome(RobotsVerdict(record.verdict), record.body, record.reason)
        if len(outcome.text) > PARSE_ASIDE:
            rules = await asyncio.to_thread(RobotsRules, outcome, self.token, self.settings.robots_max_delay)
        else:
            rules = RobotsRules(outcome, self.token, self.settings.robots_max_delay)
        self._remember(host, rules)
        held = self.waiting.pop(host, ())
        if (rules.delay or fetched) and held:
            # robots.txt was the host's first request: its first row waits the host's pace.
            self.pace(host, rules.delay, fetched)
        for item in held:
            await self._pass(item, rules)

    def _remember(self, host: str, rules: RobotsRules) -> None:
        old = self.rules.pop(host, None)
        if old is not None:
            self._weight -= old.weight
        self.rules[host] = rules
        self._weight += rules.weight
        while self._weight > RULES_BUDGET and len(self.rules) > 1:
            _, dropped = self.rules.popitem(last=False)
            self._weight -= dropped.weight

    # --- fetching robots.txt ---------------------------------------------------------------

    async def run(self, fetcher: Fetcher) -> None:
        """Fetch the claimed hosts' robots.txt with a fixed pool of tasks, and look for other
        workers' decisions, until close()."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._poll())
                for _ in range(self.settings.concurrency):
                    tg.create_task(self._fetch_loop(fetcher))
        finally:
            if not self._closed:  # failed: the claims are left to expire
                self.close()

    async def _fetch_loop(self, fetcher: Fetcher) -> None:
        while (host := await self._queue.get()) is not None:
            if host not in self.claimed:
                continue
            # Counted among the worker's requests in flight until the host's rows are let go: a
            # worker whose rows all wait here is not starved, and does not lease further ahead.
            self.fetching(1)
            try:
                await self._fetch(fetcher, host)
            finally:
                self.fetching(-1)

    async def _fetch(self, fetcher: Fetcher, host: str) -> None:
        # The same fetch path as any request: address policy, timeouts, the connection pool;
        # at most 5 redirects and the first 500 KiB, as RFC 9309 allows.
        attempt = await fetcher.attempt(
            "GET", robots_url(host), encoded=True, keep_first=BODY_LIMIT, max_redirects=MAX_REDIRECTS
        )
        self.fetches += 1
        attempts = self._attempts[host] = self._attempts.get(host, 0) + 1
        body = attempt.body[1] if attempt.body is not None else None
        outcome = outcome_of(status=attempt.status, error_kind=attempt.error_kind, error=attempt.error, body=body)
        if outcome is None:
            failure = describe_failure(attempt.status, attempt.error)
            if attempts < self.policy.max_attempts:
                log.info("robots.txt of %s: %s; trying again", host, failure)
                self._later(host, backoff(attempts, self.policy, self._rng))
                return
            outcome = unreachable(failure, attempts)
        # Stored even while draining: a fetch made is a fetch the resume need not make again.
        record = await self._ledger(
            decide_robots, host, RobotsRecord(outcome.verdict.value, outcome.text, outcome.reason), attempts
        )
        self._attempts.pop(host, None)
        self.claimed.discard(host)
        await self._decided(host, record, fetched=True)

    def _later(self, host: str, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def again() -> None:
            self._timers.discard(handle)
            self._queue.put_nowait(host)

        handle = loop.call_later(delay, again)
        self._timers.add(handle)

    async def _poll(self) -> None:
        while not self._closed:
            if not self.awaited:
                self._awaiting.clear()
                await self._awaiting.wait()
                continue
            await asyncio.sleep(ROBOTS_POLL)
            if self.awaited and not self._closed:
                await self._ask(sorted(self.awaited))

    # --- ending ----------------------------------------------------------------------------

    def clear(self) -> int:
        """Drop every held item (a drain: their chunks are given back); return how many."""
        dropped = sum(len(held) for held in self.waiting.values())
        self.waiting.clear()
        return dropped

    def close(self) -> None:
        """Stop the fetch tasks and the poll (what is under way ends first)."""
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for _ in range(self.settings.concurrency):
            self._queue.put_nowait(None)
        self._awaiting.set()

    async def renew(self, db: WorkerLedger) -> None:
        """With the heartbeat, on its ledger: our claims stay ours while we live."""
        if self.claimed:
            await db.renew_robots_claims(self.owner, self._claim_seconds)

    async def aclose(self) -> None:
        """Give unfinished claims back (another worker or a resume takes them at once), and close."""
        try:
            if self.claimed:
                await self._ledger(release_robots_claims, self.owner)
        finally:
            await self.db.close()
