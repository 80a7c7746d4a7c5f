"""What goes on the wire: the request line and headers a loopback server records byte for byte,
for rows whose URLs hold reserved escapes, spaces, non-ASCII, an IDN host or a password; and a
row's own headers on redirects to the same and to another origin."""

from __future__ import annotations

import asyncio
import base64

import asyncpg
import pytest
from aiohttp import web

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.fetch.fetcher import Fetcher
from crawler.job.crawl import crawl
from crawler.mock.dns_responder import start_responder, zone_answer
from crawler.urls import request_url


class RecordingServer:
    """A raw HTTP/1.1 server on 127.0.0.1 that keeps each request's head exactly as received."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> RecordingServer:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def request_lines(self) -> list[bytes]:
        return [head.split(b"\r\n", 1)[0] for head in self.heads]

    def header(self, index: int, name: bytes) -> bytes | None:
        for line in self.heads[index].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


# (the row's path and query, the request target that must be sent)
TARGETS = [
    ("/x?sig=a%2Fb%3D%3D", b"/x?sig=a%2Fb%3D%3D"),
    ("/path;v=1/%3Bx", b"/path;v=1/%3Bx"),
    ("/?next=http%3A%2F%2Fexample.com%2F", b"/?next=http%3A%2F%2Fexample.com%2F"),
    ("/q?x=a b", b"/q?x=a%20b"),
    ("/q?x=a+b", b"/q?x=a+b"),
    ("/caf\u00e9?q=\u00e9\u20ac", b"/caf%C3%A9?q=%C3%A9%E2%82%AC"),
    ("/%7e/%7E/%2f", b"/%7e/%7E/%2f"),
    ("/a|b?c={d}", b"/a%7Cb?c=%7Bd%7D"),
    ("/x?y#fragment", b"/x?y"),
    ("/empty?", b"/empty"),  # an empty query: aiohttp (yarl) cannot send one
]


@pytest.mark.parametrize(("tail", "target"), TARGETS)
async def test_the_request_target_is_the_rows_url_with_a_browsers_changes_only(tail: str, target: bytes) -> None:
    async with RecordingServer() as server:
        url = request_url(f"http://127.0.0.1:{server.port}{tail}")
        async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
            attempt = await fetcher.attempt("GET", url, encoded=True)
    assert attempt.status == 200, attempt.error
    assert server.request_lines() == [b"GET " + target + b" HTTP/1.1"]
    assert attempt.final_url == url


async def test_a_password_is_sent_as_basic_authorization_never_on_the_request_line() -> None:
    async with RecordingServer() as server:
        url = request_url(f"http://alice:p%40ss@127.0.0.1:{server.port}/private")
        async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
            attempt = await fetcher.attempt("GET", url, encoded=True)
    assert attempt.status == 200, attempt.error
    assert server.request_lines() == [b"GET /private HTTP/1.1"]
    assert server.header(0, b"Authorization") == b"Basic " + base64.b64encode(b"alice:p@ss")
    assert b"p@ss" not in server.heads[0] and b"p%40ss" not in server.heads[0]


async def test_an_idn_host_is_looked_up_and_sent_as_punycode() -> None:
    # A DNS responder on loopback answers the example zone with 127.0.0.1: the name the crawler
    # asks it about is the punycode one, and so is the Host header.
    transport, responder, where = await start_responder(zone_answer("example", "127.0.0.1"))
    try:
        async with RecordingServer() as server:
            url = request_url(f"http://B\u00fccher.example:{server.port}/b\u00fccher")
            settings = test_settings(allow_net=["127.0.0.1/32"], dns_servers=[where])
            async with Fetcher(settings) as fetcher:
                attempt = await fetcher.attempt("GET", url, encoded=True)
    finally:
        transport.close()
    assert attempt.status == 200, attempt.error
    assert {name for name, _ in responder.asked} == {"xn--bcher-kva.example"}
    assert server.request_lines() == [b"GET /b%C3%BCcher HTTP/1.1"]
    assert server.header(0, b"Host") == f"xn--bcher-kva.example:{server.port}".encode()


async def test_a_crawl_sends_each_rows_url_as_the_row_asked(session_dsn, tmp_path) -> None:
    """Through the whole path: ingest, the ledger, a worker process, the wire."""
    async with RecordingServer() as server:
        base = f"http://127.0.0.1:{server.port}"
        rows = [f"{base}{tail}" for tail, _ in TARGETS] + [f"http://alice:pw@127.0.0.1:{server.port}/login"]
        path = tmp_path / "urls.txt"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        settings = test_settings(workers=1, max_attempts=1, allow_net=["127.0.0.1/32"])
        code = await crawl(
            session_dsn, settings, input_path=str(path), url_column=None, job_name="wire", summary_json=None, quiet=True
        )
    assert code == EXIT_OK
    # The rows "/x?y#fragment" and "/x?y" are one request: the fragment is not sent.
    expected = {b"GET " + target + b" HTTP/1.1" for _, target in TARGETS} | {b"GET /login HTTP/1.1"}
    assert sorted(server.request_lines()) == sorted(expected)
    conn = await asyncpg.connect(session_dsn)
    try:
        stored = await conn.fetch(
            "SELECT q.url, q.normalized_url, q.given_url FROM requests q JOIN jobs j ON j.id = q.job_id"
            " WHERE j.name = 'wire' ORDER BY q.row_no"
        )
    finally:
        await conn.close()
    assert stored[0]["url"] == f"{base}/x?sig=a%2Fb%3D%3D" and stored[0]["given_url"] is None
    assert stored[3]["url"] == f"{base}/q?x=a%20b" and stored[3]["given_url"] == f"{base}/q?x=a b"
    assert stored[6]["normalized_url"] == f"{base}/~/~/%2F"


# --- a row's own headers and redirects --------------------------------------------------------


@pytest.fixture
async def two_origins(aiohttp_server):
    """Two servers on loopback, two origins (their ports differ); each records what it got."""
    seen: list[tuple[str, str, dict]] = []
    origins: dict[str, str] = {}

    def app(name: str, other: str) -> web.Application:
        async def record(request: web.Request) -> web.StreamResponse:
            seen.append((name, request.path, dict(request.headers)))
            hop = request.match_info["hop"]
            if hop in ("to-other", "back"):
                raise web.HTTPFound(f"{origins[other]}/end")
            if hop == "to-self":
                raise web.HTTPFound("/end")
            if hop == "bounce":  # to the other origin, whose /back sends it here again
                raise web.HTTPFound(f"{origins[other]}/back")
            return web.Response(text="ok")

        application = web.Application()
        application.router.add_get("/{hop}", record)
        return application

    a, b = await aiohttp_server(app("a", "b")), await aiohttp_server(app("b", "a"))
    origins.update(a=f"http://127.0.0.1:{a.port}", b=f"http://127.0.0.1:{b.port}")
    return (origins["a"], origins["b"]), seen


HEADERS = '{"User-Agent":"row-agent/1","X-Api-Key":"k-123"}'


async def test_a_rows_headers_are_dropped_on_a_redirect_to_another_origin(two_origins) -> None:
    (a, b), seen = two_origins
    async with Fetcher(test_settings(allow_net=["127.0.0.1/32"], user_agent="crawler-test")) as fetcher:
        attempt = await fetcher.attempt("GET", f"{a}/to-other", headers=HEADERS, encoded=True)
    assert attempt.status == 200 and attempt.final_url == f"{b}/end"
    (first, _, sent_first), (second, path, sent_second) = seen
    assert (first, second, path) == ("a", "b", "/end")
    assert sent_first["X-Api-Key"] == "k-123" and sent_first["User-Agent"] == "row-agent/1"
    assert "X-Api-Key" not in sent_second
    assert sent_second["User-Agent"] == "crawler-test"  # the crawler's own, as on any request


async def test_a_rows_headers_follow_a_redirect_within_its_origin(two_origins) -> None:
    (a, _), seen = two_origins
    async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
        attempt = await fetcher.attempt("GET", f"{a}/to-self", headers=HEADERS, encoded=True)
    assert attempt.status == 200
    assert [(name, path, sent.get("X-Api-Key")) for name, path, sent in seen] == [
        ("a", "/to-self", "k-123"),
        ("a", "/end", "k-123"),
    ]


async def test_a_rows_headers_go_only_to_its_origin_along_a_chain_that_returns(two_origins) -> None:
    (a, _), seen = two_origins
    async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
        attempt = await fetcher.attempt("GET", f"{a}/bounce", headers=HEADERS, encoded=True)
    assert attempt.status == 200
    assert [(name, path, sent.get("X-Api-Key")) for name, path, sent in seen] == [
        ("a", "/bounce", "k-123"),
        ("b", "/back", None),
        ("a", "/end", "k-123"),
    ]


async def test_a_urls_password_is_not_sent_to_another_origin(two_origins) -> None:
    (a, _), seen = two_origins
    url = request_url(a.replace("http://", "http://alice:pw@") + "/to-other")
    async with Fetcher(test_settings(allow_net=["127.0.0.1/32"])) as fetcher:
        attempt = await fetcher.attempt("GET", url, encoded=True)
    assert attempt.status == 200
    assert "Authorization" in seen[0][2] and "Authorization" not in seen[1][2]
