"""Nothing a server sends stops a job: a raw-socket server on loopback answers with hostile bytes
in every place the crawler stores (status line, reason phrase, ETag, Last-Modified, Content-Type,
Location, redirect chains), and the job still ends done with one result per row, every good row
ok and no worker dead (a worker's death would stop the job: no restarts are allowed).

The generated answers are a few hundred by default; CRAWLER_HOSTILE_ROWS=3000 (or more) for the
full run."""

from __future__ import annotations

import asyncio
import os
import random
import re
from pathlib import Path

import pytest

from conftest import test_settings
from crawler.errors import EXIT_OK
from crawler.fetch.storable import MARKER
from crawler.job.crawl import crawl

SEED = 16
GENERATED = int(os.environ.get("CRAWLER_HOSTILE_ROWS", "300"))
GOOD = 100

# Pieces of hostile text: NUL and other C0, C1 (0x9b is CSI alone), ANSI and OSC sequences,
# bytes that are not UTF-8 (a lone continuation byte, an encoded surrogate, an overlong form),
# rich markup, a bidirectional override, quotes, and length.
PIECES = [
    b"\x00",
    b"\x01",
    b"\x07",
    b"\x08",
    b"\x0b",
    b"\x7f",
    b"\x85",
    b"\x9b",
    b"\xc2\x9b",
    b"\xc2\x85",
    b"\x1b[31m",
    b"\x1b[2J",
    b"\x1b[0m",
    b"\x1b]0;owned\x07",
    b"\x1b]8;;http://x/\x1b\\",
    b"\x1bc",
    b"\xff",
    b"\xfe",
    b"\xe9",
    b"\xc3(",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
    b"[bold red]",
    b"[/]",
    b"\xe2\x80\xae",
    b"\xe2\x80\xa8",
    b"'",
    b'"',
    b"\\",
    b"%00",
    b";",
    b",",
    b"caf\xc3\xa9",
    b"\t",
    b"A" * 700,
    b"\xe2\x98\x95",
]
STATUSES = [200, 200, 201, 203, 299, 301, 302, 303, 307, 308, 404, 410, 418, 500, 503, 599]
CRLF = b"\r\n"


def hostile(rng: random.Random) -> bytes:
    parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 6))]
    parts.insert(rng.randint(0, len(parts)), b"x%d" % rng.randint(0, 99))
    return b"".join(parts)


def generated_answer(n: int, port: int) -> bytes:
    """The answer to /h/<n>, the same on every try (a retry sees what the first try saw)."""
    rng = random.Random(SEED * 1_000_003 + n)
    status = rng.choice(STATUSES)
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
    line = b"%s %d %s" % (version, status, hostile(rng)) if rng.random() < 0.9 else b"%s %d" % (version, status)
    headers = []
    for name in (b"ETag", b"Last-Modified", b"Content-Type"):
        if rng.random() < 0.6:
            headers.append(name + b": " + hostile(rng))
    if status in (301, 302, 303, 307, 308):
        # Only ever this server: a path after /h/ or an absolute URL to 127.0.0.1, never a host
        # name (no DNS query leaves the machine).
        target = rng.choice(
            [
                b"/h/%d" % rng.randrange(GENERATED),  # a chain through other generated answers
                b"/h/%d?" % rng.randrange(GENERATED) + hostile(rng),
                b"/h/" + hostile(rng),
                b"http://127.0.0.1:%d/h/" % port + hostile(rng),
                b"/good/0",
            ]
        )
        headers.append(b"Location: " + target)
    if status == 503:
        headers.append(b"Retry-After: " + rng.choice([b"0", hostile(rng)]))
    body = hostile(rng) if rng.random() < 0.5 else b""
    headers += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return CRLF.join([line, *headers, b"", body])


def simple(status_line: bytes, *headers: bytes, body: bytes = b"ok") -> bytes:
    return CRLF.join([status_line, *headers, b"Content-Length: %d" % len(body), b"Connection: close", b"", body])


def named_answers(port: int) -> dict[str, bytes]:
    """The cases found by hand: each once stopped a whole job."""
    return {
        "nul-reason": simple(b"HTTP/1.1 500 Bad\x00Thing"),
        "latin1-reason": simple(b"HTTP/1.1 500 Erreur syst\xe8me"),
        "c1-reason": simple(b"HTTP/1.1 404 Not\x9b2JFound\xc2\x9b31m"),
        "ansi-reason": simple(b"HTTP/1.1 503 \x1b[31mred\x1b[0m \x1b]0;owned\x07"),
        "markup-reason": simple(b"HTTP/1.1 500 [bold red]alarm[/] \x1b[5m"),
        "latin1-etag": simple(b"HTTP/1.1 200 OK", b'ETag: "caf\xe9"', b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT"),
        "escape-etag": simple(b"HTTP/1.1 200 OK", b'ETag: "\x1b[2J"'),
        "long-etag": simple(b"HTTP/1.1 200 OK", b'ETag: "' + b"e" * 9000 + b'"'),
        "latin1-last-modified": simple(b"HTTP/1.1 200 OK", b"Last-Modified: Mon, 01 Ao\xfbt 2024 00:00:00 GMT"),
        "latin1-content-type": simple(b"HTTP/1.1 200 OK", b"Content-Type: text/html; charset=\xe9\xff"),
        "c1-content-type": simple(b"HTTP/1.1 200 OK", b"Content-Type: text/\x9bhtml\x1b[0m"),
        "hostile-location": simple(b"HTTP/1.1 302 Found", b"Location: /good/1?\xff\x1b[31m\xc2\x9b"),
        "absolute-location": simple(
            b"HTTP/1.1 301 Moved", b"Location: http://127.0.0.1:%d/good/2#\xe9\x1b]0;x\x07" % port
        ),
        "redirect-to-nul-reason": simple(b"HTTP/1.1 307 Again", b"Location: /named/nul-reason"),
        "nul-in-header": simple(b"HTTP/1.1 200 OK", b"ETag: a\x00b"),
    }


GOOD_ANSWER = simple(
    b"HTTP/1.1 200 OK",
    b'ETag: "good"',
    b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT",
    b"Content-Type: text/plain; charset=utf-8",
)


class HostileServer:
    """Reads one request per connection (bounded), answers by its path, closes."""

    def __init__(self) -> None:
        self.port = 0
        self.answered = 0
        self._server: asyncio.Server | None = None
        self._named: dict[str, bytes] = {}

    async def __aenter__(self) -> HostileServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._named = named_answers(self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, path: str) -> bytes:
        kind, _, rest = path.lstrip("/").partition("/")
        if kind == "good":
            return GOOD_ANSWER
        if kind == "named" and rest in self._named:
            return self._named[rest]
        if kind == "h" and (number := re.match(r"\d+", rest)) and rest == number.group():
            return generated_answer(int(rest), self.port)
        return simple(b"HTTP/1.1 404 Not Found")  # what a hostile Location led to

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1].decode("latin-1")
            writer.write(self.answer(path))
            self.answered += 1
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


def input_rows(base: str) -> list[str]:
    rows = [f"{base}/named/{name}" for name in named_answers(0)]
    rows += [f"{base}/h/{n}" for n in range(GENERATED)]
    rows += [f"{base}/good/{n}" for n in range(GOOD)]
    return rows


UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str | None) -> bool:
    return text is None or UNSAFE.search(text) is None


async def crawl_hostile(dsn: str, path: Path, name: str, **overrides) -> int:
    settings = test_settings(
        worker_restarts=0, max_attempts=2, connect_timeout=5.0, read_timeout=10.0, total_timeout=20.0, **overrides
    )
    return await crawl(
        dsn, settings, input_path=str(path), url_column=None, job_name=name, summary_json=None, quiet=True
    )


@pytest.mark.parametrize("variant", ["plain", "cache-ttl", "store-bodies"])
async def test_a_hostile_server_cannot_stop_a_job(session_dsn, db, tmp_path, variant):
    overrides = {"plain": {}, "cache-ttl": {"cache_ttl": 3600.0}, "store-bodies": {"store_bodies": True}}[variant]
    async with HostileServer() as server:
        rows = input_rows(server.url)
        path = tmp_path / "hostile.txt"
        path.write_text("\n".join(rows) + "\n")
        names = [f"hostile-{variant}"] + ([f"hostile-{variant}-again"] if variant == "cache-ttl" else [])
        for name in names:  # with --cache-ttl, a second job is answered from what the first stored
            assert await crawl_hostile(session_dsn, path, name, **overrides) == EXIT_OK
            job_id = await db.fetchval("SELECT id FROM jobs WHERE name = $1", name)
            assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", job_id) == "done"
            requests = await db.fetchval("SELECT count(*) FROM requests WHERE job_id = $1", job_id)
            results = await db.fetch(
                "SELECT q.row_no, q.url, r.status, r.final_url, r.error_kind, r.error, r.from_cache"
                " FROM requests q JOIN results r USING (job_id, row_no) WHERE q.job_id = $1",
                job_id,
            )
            assert requests == len(rows) and len(results) == len(rows)
            by_url = {r["url"]: r for r in results}
            good = [by_url[u] for u in rows if "/good/" in u]
            assert [(r["status"], r["error_kind"], r["error"]) for r in good] == [(200, None, None)] * GOOD
            assert all(printable(r["error"]) and printable(r["final_url"]) for r in results)
            if name == names[0]:
                assert server.answered >= len(rows)
                nul = by_url[f"{server.url}/named/nul-reason"]
                assert (nul["status"], nul["error_kind"]) == (500, "http_status")
                assert nul["error"] == f"HTTP 500 Bad\\x00Thing; {MARKER}: reason"
                assert (
                    by_url[f"{server.url}/named/latin1-reason"]["error"]
                    == f"HTTP 500 Erreur syst\ufffdme; {MARKER}: reason"
                )
                markup = by_url[f"{server.url}/named/markup-reason"]
                assert markup["error"].startswith("HTTP 500 [bold red]alarm[/] \\x1b[5m")
                chained = by_url[f"{server.url}/named/redirect-to-nul-reason"]
                assert chained["final_url"] == f"{server.url}/named/nul-reason" and chained["status"] == 500
                moved = by_url[f"{server.url}/named/hostile-location"]
                assert moved["status"] == 200 and moved["final_url"].startswith(f"{server.url}/good/1?")
                etag = by_url[f"{server.url}/named/latin1-etag"]
                assert etag["status"] == 200 and etag["error_kind"] is None
                if variant == "cache-ttl":
                    assert etag["error"] == f"{MARKER}: etag"
                    stored = await db.fetch(
                        "SELECT etag, last_modified, final_url FROM response_cache WHERE job_id = $1", job_id
                    )
                    assert stored and all(printable(v) for r in stored for v in r.values())
                    assert {r["etag"] for r in stored} >= {'"good"'}
            else:
                assert sum(1 for r in results if r["from_cache"]) >= GOOD
        if variant == "store-bodies":
            bodies = await db.fetch("SELECT content_type FROM bodies WHERE job_id = $1", job_id)
            assert len(bodies) >= GOOD and all(printable(r["content_type"]) for r in bodies)
            types = {r["content_type"] for r in bodies}
            # a lone 0x9b byte is not UTF-8 (C1 in UTF-8 is c2 9b): replaced, not escaped
            assert {"text/html; charset=\ufffd\ufffd", "text/\ufffdhtml\\x1b[0m"} <= types
