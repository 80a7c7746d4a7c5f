"""A worker's per-host state follows its work in flight: after a crawl over many host names on
loopback, the hosts that answered and learnt nothing are all forgotten, while one that was
overloaded is remembered."""

from __future__ import annotations

from aiohttp import web

from conftest import test_settings
from crawler.fetch.process import open_worker
from crawler.job.inputs import parse_request
from crawler.ledger.chunks import mark_ingested, store_chunk
from crawler.ledger.jobs import create_job
from crawler.mock.dns_responder import start_responder, zone_answer

HOSTS = 150
PER_HOST = 3


async def test_after_a_crawl_over_many_hosts_only_the_overloaded_one_is_remembered(db, session_dsn, aiohttp_server):
    async def answer(request: web.Request) -> web.Response:
        if request.host.startswith("busy."):
            return web.Response(status=503, text="later")  # an overload: the host's limit halves
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server = await aiohttp_server(app)
    transport, _, where = await start_responder(zone_answer("many.test"))
    try:
        names = [f"h{i}.many.test" for i in range(HOSTS)] + ["busy.many.test"]
        cells = [f"http://{name}:{server.port}/{j}" for j in range(PER_HOST) for name in names]
        settings = test_settings(dns_servers=[where], workers=1, max_attempts=1, chunk_size=100)
        job = await create_job(
            db, name="many-hosts", input="test", settings={k: v for k, v in settings.as_dict().items() if k != "dsn"}
        )
        rows = [parse_request(n, cell) for n, cell in enumerate(cells, 1)]
        for chunk_no in range(0, len(rows), 100):
            await store_chunk(db, job.id, chunk_no // 100, rows[chunk_no : chunk_no + 100])
        await mark_ingested(db, job.id)
        async with open_worker(session_dsn, job.id, settings) as worker:
            stats = await worker.run()
    finally:
        transport.close()
    assert stats.fetched == len(cells)
    statuses = dict(await db.fetch("SELECT status, count(*) FROM results WHERE job_id = $1 GROUP BY status", job.id))
    assert statuses == {200: HOSTS * PER_HOST, 503: PER_HOST}
    # Every host that answered, and learnt nothing, was forgotten once it had nothing pending.
    assert list(worker.hosts.hosts) == [f"http://busy.many.test:{server.port}"]
