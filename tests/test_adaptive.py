"""Adaptive per-host concurrency end to end: a host that turns away what exceeds its capacity
(503 at once) teaches a crawl to send about as much as it can take. The same crawl with a fixed
per-host limit, in the same test, is the yardstick."""

from __future__ import annotations

import aiohttp
import pytest

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl
from crawler.mock.server import start_mock_server

pytestmark = pytest.mark.one_server

ROWS, CAPACITY = 300, 4


async def crawl_against_a_small_host(session_dsn, db, tmp_path, name: str, *, adaptive: bool) -> tuple[dict, list]:
    runner, base = await start_mock_server(capacity=CAPACITY)
    try:
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(f"{base}/delay/20/{i}\n" for i in range(ROWS)))
        # Backoff as a crawl has it, not the tests' near-zero one: a row turned away in the first
        # burst must not spend its six tries before the limit has adapted (a cold CI run answered
        # only 264 of 300 with a 10 ms backoff).
        settings = test_settings(
            workers=1,
            concurrency=32,
            per_host_concurrency=16,
            per_host_max=32,
            adaptive_concurrency=adaptive,
            max_attempts=6,
            backoff_base=0.1,
            backoff_max=0.5,
        )
        assert (
            await crawl(
                session_dsn,
                settings,
                input_path=str(path),
                url_column=None,
                job_name=name,
                summary_json=None,
                quiet=True,
            )
            == EXIT_OK
        )
        async with aiohttp.ClientSession() as session:
            stats = await (await session.get(f"{base}/__stats")).json()
    finally:
        await runner.cleanup()
    rows = await db.fetch(
        "SELECT r.status, r.attempts FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.name = $1", name
    )
    return stats, rows


async def test_adaptive_concurrency_learns_a_hosts_capacity(session_dsn, db, tmp_path):
    adaptive, adaptive_rows = await crawl_against_a_small_host(session_dsn, db, tmp_path, "adaptive-on", adaptive=True)
    fixed, fixed_rows = await crawl_against_a_small_host(session_dsn, db, tmp_path, "adaptive-off", adaptive=False)
    # The host turned away a fraction of what a fixed limit of 16 against a capacity of 4 makes it
    # turn away, as the server counted them in the same test: under half (261 against 1 290 on a
    # loaded two-core machine, 510-652 against 1 247-1 598 on a quiet one; with the limit's halving
    # removed, 1 444 against 1 427)...
    assert 2 * adaptive["rejected"] < fixed["rejected"], (adaptive, fixed)
    assert adaptive["hits"]["total"] < fixed["hits"]["total"]
    assert sum(r["attempts"] for r in adaptive_rows) < sum(r["attempts"] for r in fixed_rows)
    # ...and at least as many rows got their answer within their attempts, nearly all of them.
    answered = sum(r["status"] == 200 for r in adaptive_rows)
    assert answered >= 0.95 * ROWS and answered >= sum(r["status"] == 200 for r in fixed_rows)
