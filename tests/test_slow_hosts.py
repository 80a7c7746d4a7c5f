"""No head-of-line blocking: a few slow hosts among fast ones cost only their own per-host slots.
Seen from the server: the slow hosts' answers are held back until every fast row has arrived,
which can only happen if the fast hosts were served while the slow ones were still waiting."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from crawler.crawl import crawl
from crawler.dns_responder import start_responder, zone_answer
from crawler.errors import EXIT_OK

from conftest import test_settings

SLOW_HOSTS, SLOW_ROWS = 2, 5
FAST_HOSTS, FAST_ROWS = 10, 19  # 190 fast rows, 10 slow ones: 5 % of the rows on slow hosts
HOLD_LIMIT = 30.0  # seconds a slow answer waits for the fast rows before giving up on them


class Site:
    """One server for every host name: a request to slow-* is answered only once all the fast
    rows have arrived (or HOLD_LIMIT passed, which the test counts as blocking)."""

    def __init__(self) -> None:
        self.fast_arrived = 0
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


async def test_slow_hosts_do_not_hold_up_the_fast_ones(session_dsn, db, site, tmp_path):
    transport, _, where = await start_responder(zone_answer("test"))
    try:
        # The slow rows come first: a pool that took work in file order would fill with them.
        rows = [f"http://slow-{i % SLOW_HOSTS}.test:{site.port}/s/{i}" for i in range(SLOW_HOSTS * SLOW_ROWS)]
        rows += [f"http://fast-{i % FAST_HOSTS}.test:{site.port}/f/{i}" for i in range(FAST_HOSTS * FAST_ROWS)]
        path = tmp_path / "urls.txt"
        path.write_text("".join(f"{row}\n" for row in rows))
        # One worker of 8 fetch tasks, 2 per host: the slow hosts can hold 4 of them, never 8.
        settings = test_settings(workers=1, concurrency=8, per_host_concurrency=2, adaptive_concurrency=False,
                                 dns_servers=[where], allow_net=["127.0.0.1/32"], read_timeout=60.0,
                                 total_timeout=120.0)
        code = await crawl(session_dsn, settings, input_path=str(path), url_column=None, job_name="slow-hosts",
                           summary_json=None, quiet=True)
    finally:
        transport.close()
    assert code == EXIT_OK
    statuses = await db.fetch("SELECT r.status, count(*) FROM results r JOIN jobs j ON j.id = r.job_id"
                              " WHERE j.name = 'slow-hosts' GROUP BY r.status")
    assert {row["status"]: row["count"] for row in statuses} == {200: len(rows)}
    assert len(site.slow_released_by_fast) == SLOW_HOSTS * SLOW_ROWS
    assert all(site.slow_released_by_fast), "the fast rows waited behind the slow ones"
