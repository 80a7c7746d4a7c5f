"""No head-of-line blocking: slow hosts among fast ones cost only their own per-host slots.
Seen from the server: the slow hosts' answers are held back until every fast row has arrived,
which can only happen if the fast hosts were served while the slow ones were still waiting.
With a few slow hosts the per-host limit is enough; with more slow hosts than fetch tasks, the
worker adds tasks in place of the slow requests (slow_after)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.mock.dns_responder import start_responder, zone_answer

pytestmark = pytest.mark.one_server

FAST_HOSTS, FAST_ROWS = 10, 19  # 190 fast rows
HOLD_LIMIT = 30.0  # seconds a slow answer waits for the fast rows before giving up on them


class Site:
    """One server for every host name: a request to slow-* is answered only once all the fast
    rows have arrived (or HOLD_LIMIT passed, which the test counts as blocking)."""

    def __init__(self) -> None:
        self.fast_arrived = 0
        self.port = 0
        self.all_fast = asyncio.Event()
        self.slow_released_by_fast: list[bool] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.host.startswith("slow-"):
            try:
                await asyncio.wait_for(self.all_fast.wait(), HOLD_LIMIT)
            except TimeoutError:
                pass
            self.slow_released_by_fast.append(self.all_fast.is_set())
        else:
            self.fast_arrived += 1
            if self.fast_arrived == FAST_HOSTS * FAST_ROWS:
                self.all_fast.set()
        return web.Response(text="ok")


@pytest.fixture
async def site(aiohttp_server):
    site = Site()
    app = web.Application()
    app.router.add_get("/{tail:.*}", site.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    site.port = server.port
    yield site


async def crawl_slow_and_fast(
    site: Site, dsn: str, db, tmp_path, name: str, *, slow_hosts: int, slow_rows: int, **settings
) -> None:
    transport, _, where = await start_responder(zone_answer("test"))
    try:
        # The slow rows come first: a pool that took work in file order would fill with them.
        rows = [f"http://slow-{i % slow_hosts}.test:{site.port}/s/{i}" for i in range(slow_hosts * slow_rows)]
        rows += [f"http://fast-{i % FAST_HOSTS}.test:{site.port}/f/{i}" for i in range(FAST_HOSTS * FAST_ROWS)]
        path = tmp_path / "urls.txt"
        path.write_text("".join(f"{row}\n" for row in rows))
        options = dict(
            workers=1,
            concurrency=8,
            adaptive_concurrency=False,
            dns_servers=[where],
            allow_net=["127.0.0.1/32"],
            read_timeout=60.0,
            total_timeout=120.0,
        )
        code = await crawl(
            dsn,
            test_settings(**{**options, **settings}),
            input_path=str(path),
            url_column=None,
            job_name=name,
            summary_json=None,
            quiet=True,
        )
    finally:
        transport.close()
    assert code == EXIT_OK
    statuses = await db.fetch(
        "SELECT r.status, count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1 GROUP BY r.status",
        name,
    )
    assert {row["status"]: row["count"] for row in statuses} == {200: len(rows)}
    assert len(site.slow_released_by_fast) == slow_hosts * slow_rows
    assert all(site.slow_released_by_fast), "the fast rows waited behind the slow ones"


async def test_a_few_slow_hosts_hold_only_their_own_slots(session_dsn, db, site, tmp_path):
    # One worker of 8 fetch tasks, 2 per host: 2 slow hosts hold 4 of them, never 8 (10 slow rows
    # among 190 fast: 5 %). The pool never widens (slow_after is past the hold).
    await crawl_slow_and_fast(
        site,
        session_dsn,
        db,
        tmp_path,
        "few-slow-hosts",
        slow_hosts=2,
        slow_rows=5,
        per_host_concurrency=2,
        slow_after=HOLD_LIMIT * 2,
    )


async def test_more_slow_hosts_than_fetch_tasks_do_not_take_the_pool(session_dsn, db, site, tmp_path):
    # 12 slow hosts, one row each, would hold all 8 fetch tasks: the worker adds tasks in their
    # place once they have run slow_after (up to 4 x 8 = 32 in all).
    await crawl_slow_and_fast(
        site,
        session_dsn,
        db,
        tmp_path,
        "many-slow-hosts",
        slow_hosts=12,
        slow_rows=1,
        per_host_concurrency=1,
        slow_after=0.2,
    )
