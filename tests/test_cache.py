"""The request cache against the mock server, counting its hits: duplicates fetched once within a
job (across chunks and workers), and responses reused or revalidated across jobs."""

from __future__ import annotations

import aiohttp

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.job.crawl import crawl


async def hits(base: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/__hits") as resp:
            return (await resp.json())["total"]


async def run(dsn, path, name, **overrides) -> None:
    code = await crawl(
        dsn,
        test_settings(**overrides),
        input_path=str(path),
        url_column=None,
        job_name=name,
        summary_json=None,
        quiet=True,
    )
    assert code == EXIT_OK


async def outcomes(db, name: str) -> list:
    return await db.fetch(
        "SELECT r.row_no, r.status, r.from_cache, r.cache_kind, r.attempts, r.body_sha256 FROM results r"
        " JOIN jobs j ON j.id = r.job_id WHERE j.name = $1 ORDER BY r.row_no",
        name,
    )


async def test_thirty_percent_duplicates_are_fetched_once_across_chunks_and_workers(
    session_dsn, db, mock_url, tmp_path
):
    unique = 700
    lines = [f"{mock_url}/ok/{i}" for i in range(unique)]
    lines += [f"{mock_url}/ok/{(i * 7) % unique}" for i in range(300)]  # 30 %, spread over later chunks
    path = tmp_path / "dups.txt"
    path.write_text("\n".join(lines) + "\n")
    await run(session_dsn, path, "thirty-percent", workers=2, chunk_size=50)
    rows = await outcomes(db, "thirty-percent")
    assert len(rows) == 1000
    assert await hits(mock_url) == unique
    cached = [r for r in rows if r["from_cache"]]
    assert len(cached) == 300 and {r["cache_kind"] for r in cached} == {"duplicate"}
    assert all(r["status"] == 200 and r["attempts"] == 0 for r in cached)


async def test_identical_requests_in_flight_share_one_fetch(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "same.txt"
    path.write_text(f"{mock_url}/delay/200/same\n" * 200)
    await run(session_dsn, path, "single-flight", workers=2, chunk_size=10, concurrency=50)
    assert await hits(mock_url) == 1
    rows = await outcomes(db, "single-flight")
    assert len(rows) == 200 and sum(1 for r in rows if not r["from_cache"]) == 1


async def test_no_cache_fetches_every_row(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "same.txt"
    path.write_text(f"{mock_url}/ok/again\n" * 20)
    await run(session_dsn, path, "no-cache", no_cache=True)
    assert await hits(mock_url) == 20
    assert not any(r["from_cache"] for r in await outcomes(db, "no-cache"))


async def test_a_fresh_response_from_an_earlier_job_is_reused_without_a_request(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "ttl.txt"
    path.write_text("".join(f"{mock_url}/ok/ttl/{i}\n" for i in range(30)))
    await run(session_dsn, path, "ttl-first", cache_ttl=3600.0)
    assert await hits(mock_url) == 30
    await run(session_dsn, path, "ttl-second", cache_ttl=3600.0)
    assert await hits(mock_url) == 30  # no new request
    second = await outcomes(db, "ttl-second")
    assert {(r["status"], r["from_cache"], r["cache_kind"]) for r in second} == {(200, True, "fresh")}
    first = await outcomes(db, "ttl-first")
    assert [r["body_sha256"] for r in second] == [r["body_sha256"] for r in first]
    await run(session_dsn, path, "ttl-off")  # without --cache-ttl: fetched afresh
    assert await hits(mock_url) == 60


async def test_an_expired_response_is_revalidated_and_a_304_is_a_hit(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "validators.txt"
    path.write_text(f"{mock_url}/etag/one\n{mock_url}/last-modified/two\n{mock_url}/ok/no-validators\n")
    await run(session_dsn, path, "revalidate-first", cache_ttl=60.0)
    assert await hits(mock_url) == 3
    await db.execute("UPDATE response_cache SET fetched_at = now() - interval '1 hour'")  # all expired
    await run(session_dsn, path, "revalidate-second", cache_ttl=60.0)
    rows = await outcomes(db, "revalidate-second")
    assert [(r["status"], r["cache_kind"]) for r in rows] == [(200, "revalidated"), (200, "revalidated"), (200, None)]
    assert await hits(mock_url) == 6  # two conditional requests answered 304, one plain fetch


async def test_a_changed_resource_answers_200_to_revalidation_and_is_stored_anew(session_dsn, db, mock_url, tmp_path):
    path = tmp_path / "changed.txt"
    path.write_text(f"{mock_url}/etag/changed\n")
    await run(session_dsn, path, "changed-first", cache_ttl=60.0)
    await db.execute(
        "UPDATE response_cache SET fetched_at = now() - interval '1 hour', etag = '\"old-version\"'"
        " WHERE final_url LIKE '%/etag/changed'"
    )
    await run(session_dsn, path, "changed-second", cache_ttl=60.0)
    [row] = await outcomes(db, "changed-second")
    assert (row["status"], row["from_cache"], row["cache_kind"]) == (200, False, None)
    etag = await db.fetchval("SELECT etag FROM response_cache WHERE final_url LIKE '%/etag/changed'")
    assert etag != '"old-version"'


async def test_the_cross_job_cache_keeps_success_permanent_redirects_and_gone_but_not_failures(
    session_dsn, db, mock_url, tmp_path
):
    """What a later job may take from the cache instead of asking: 2xx, 301/308, 404 and 410
    (answers that stay true); never a 5xx, a 429, a temporary redirect, a 403 or a failed connection."""
    kept = [200, 203, 204, 404, 410]
    refetched = [302, 307, 400, 403, 429, 500, 502, 503]
    path = tmp_path / "statuses.txt"
    path.write_text("".join(f"{mock_url}/status/{s}\n" for s in kept + refetched) + "http://127.0.0.1:1/refused\n")
    await run(session_dsn, path, "cache-statuses-first", cache_ttl=3600.0, max_attempts=1)
    first = await hits(mock_url)
    assert first == len(kept) + len(refetched)
    await run(session_dsn, path, "cache-statuses-second", cache_ttl=3600.0, max_attempts=1)
    rows = await outcomes(db, "cache-statuses-second")
    served = {r["status"] for r in rows if r["cache_kind"] == "fresh"}
    assert served == set(kept)
    assert {r["status"] for r in rows if r["cache_kind"] is None} == set(refetched) | {None}
    assert await hits(mock_url) == first + len(refetched)  # each of those asked again, once
