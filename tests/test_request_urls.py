"""The ledger keeps what a row asked for apart from what identifies it: `url` is sent, duplicates
share `normalized_url`, the export shows `given_url` (each stored only when it differs)."""

from __future__ import annotations

from crawler.job.inputs import RequestRow, parse_request
from crawler.ledger.chunks import chunk_requests, lease_chunk, mark_ingested, store_chunk
from crawler.ledger.jobs import create_job


async def test_equivalent_spellings_are_one_fetch_and_others_are_two(db):
    job = await create_job(db, name="spellings", input="test", settings={})
    cells = [
        "http://a.example/%7Euser",  # 1
        "http://A.example/~user",  # 2: the same request as 1
        "http://a.example/a%2Fb",  # 3
        "http://a.example/a/b",  # 4: not the same as 3
        "http://a.example/?x=a+b",  # 5
        "http://a.example/?x=a b",  # 6: not the same as 5 (a space is %20)
        "http://a.example/?x=a%20b",  # 7: the same as 6
    ]
    rows = [parse_request(n, cell) for n, cell in enumerate(cells, 1)]
    assert all(isinstance(row, RequestRow) for row in rows)
    assert await store_chunk(db, job.id, 0, rows) == 5
    stored = {
        r["row_no"]: r
        for r in await db.fetch(
            "SELECT row_no, url, normalized_url, given_url, dup_of FROM requests WHERE job_id = $1", job.id
        )
    }
    assert {n: r["dup_of"] for n, r in stored.items()} == {1: None, 2: 1, 3: None, 4: None, 5: None, 6: None, 7: 6}
    assert (stored[1]["url"], stored[1]["normalized_url"], stored[1]["given_url"]) == (
        "http://a.example/%7Euser",
        "http://a.example/~user",
        None,
    )
    assert (stored[2]["url"], stored[2]["normalized_url"], stored[2]["given_url"]) == (
        "http://a.example/~user",
        None,
        "http://A.example/~user",
    )
    assert (stored[6]["url"], stored[6]["given_url"]) == ("http://a.example/?x=a%20b", "http://a.example/?x=a b")
    assert stored[3]["url"] == "http://a.example/a%2Fb" and stored[3]["normalized_url"] is None  # the same


async def test_a_leased_chunk_gives_the_worker_the_url_to_send(db):
    job = await create_job(db, name="to-send", input="test", settings={})
    rows = [
        parse_request(1, "http://a.example/x?sig=a%2fb%3D%3d#f"),
        parse_request(2, "http://a.example/x?sig=a%2Fb%3D%3D"),
    ]
    await store_chunk(db, job.id, 0, rows)
    await mark_ingested(db, job.id)
    chunk = await lease_chunk(db, job.id, "worker-1", 60)
    requests = await chunk_requests(db, job.id, chunk)
    # one fetch (the two differ only in the case of escapes' hex digits), sent as row 1 wrote it
    assert [(r["row_no"], r["url"]) for r in requests] == [(1, "http://a.example/x?sig=a%2fb%3D%3d")]


def test_a_lone_surrogate_makes_an_invalid_row_not_an_exception():
    from crawler.job.inputs import InvalidRow

    for cells in (
        {"cell": "http://a.example/\ud800"},
        {"cell": "http://a.example/", "headers": '{"X":"\ud800"}'},
        {"cell": "http://a.example/\udcff"},
    ):
        row = parse_request(1, **cells)
        assert isinstance(row, InvalidRow) and row.reason == "row is not valid UTF-8"
        row.raw.encode("utf-8")  # printable: it can be stored
