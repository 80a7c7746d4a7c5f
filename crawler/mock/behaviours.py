r"""What each path of the mock server answers, every way a server can misbehave included.

Handlers only: an answer is decided by the path (and, for the seeded ones, the app's seed) alone,
so a test gets the same behaviour in any process on any run. A handler never makes an outbound
request; /redirect-to only names a URL in a Location header. mock_server assembles the app.

Every path is served for GET, HEAD and POST. "/.." is an optional tail of any length: it changes
nothing but the path, so that tests can get fresh hit counts, flaky counters and random draws.

Path                              Answer
/ok/..                            200 "ok\n"
/status/{code}                    status code (100-599), body "{code}\n"
/delay/{ms}/..                    200 after ms milliseconds; /capacity-delay/{ms}/.. is the same
/bytes/{n}                        200, Content-Length n; byte i is i % 256
/redirect/{n}                     302 to /redirect/{n-1}; /redirect/0 answers 200
/slow-headers/{ms}/..             nothing at all for ms, then 200 (time to first byte)
/slow-body/{ms}/{n}/..            headers at once with Content-Length n, then n one-byte chunks,
                                  each after ms (read timeouts between bytes)
/endless/..                       200, chunked, a body that never ends; stops when the client leaves
/huge-length/..                   Content-Length 10 GiB (HUGE_LENGTH), bytes until the client leaves
/gzip-bomb/{mib}                  Content-Encoding: gzip, about 1 KiB on the wire per MiB; one
                                  valid gzip member that decompresses to mib MiB of zeros
/redirect-loop/..                 302 to itself
/redirect-cycle/{n}/{i}/..        302 to /redirect-cycle/{n}/{(i+1) % n}/..: a loop through n URLs
/redirect-to?url=U&status=S       S (301, 302 (default), 303, 307 or 308) with Location: U verbatim
/reset/..                         TCP reset (SO_LINGER 0), no answer: the client sees ECONNRESET
/close/..                         clean close (FIN), no answer: the server disconnected
/garbage/..                       "HTTP/1.1 abc\r\n\r\n" (a malformed status line), then close
/garbage-bytes/{n}/..             n seeded random bytes instead of HTTP, then close
/bad-headers/..                   a valid status line, a header line without a colon, then close
/short-body/..                    Content-Length: 100, only 10 bytes, then close
/flaky/{n}/..                     503 while this exact path has had at most n hits, then 200
/flaky-reset/{n}/..               like /flaky, but a TCP reset instead of the 503
/flaky-retry-after/{n}/{s}/..     like /flaky, but 429 with Retry-After: s
/retry-after/{status}/{s}/..      status (300-599) with Retry-After: s (delta seconds)
/retry-after-date/{status}/{s}/.. status with Retry-After: the HTTP date now + s (s may be < 0)
/hit/{ms}/..                      200 after ms milliseconds, body "{k}\n": this exact path's hit count
                                  with this request (1 for its first), so each answer names the
                                  request that made it, and /__arrivals says when that one came
/random/..                        after 0-50 ms: 200 (90%), 500 (5%) or 503 (5%), drawn from the
                                  seed and the path; random_outcome() says which
/etag/..                          200 with a strong ETag (a hash of the path) and Cache-Control:
                                  max-age=60; 304 when If-None-Match has that tag or *
/last-modified/..                 200 with Last-Modified: LAST_MODIFIED and Cache-Control:
                                  max-age=60; 304 when If-Modified-Since is that date or later
/robots.txt                       the server's robots.txt, as its robots knob (--robots) says:
                                  none (default: 404), allow, disallow, wildcard, agent, huge:
                                  the files below; delay:S (disallow's rules with Crawl-delay: S);
                                  status:N (N, no file); redirect (302 to /robots/disallow.txt);
                                  redirects:N (302 through /redirect/N-1 .. /redirect/0, "ok");
                                  slow:MS (disallow after MS ms); flaky:N (500 for the first N hits,
                                  then disallow); reset (a TCP reset)
/robots/{name}.txt                the file of that name: allow (everything), disallow (/private/
                                  but /private/open/), wildcard (/*.pdf$ and /*/draft/), agent
                                  (a group for `crawler`: /ok/crawler-only/; * disallows all),
                                  huge (600 KiB: /early/ first, /late/ past 500 KiB)

Flaky paths read app[HITS], which the server's middleware counts on arrival, per process:
POST /__hits/reset (or /__stats/reset) makes every flaky path fail again.
"""

import asyncio
import functools
import hashlib
import random
import re
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from email.utils import formatdate

from aiohttp import web

HITS = web.AppKey("hits", Counter)  # request path -> how many requests arrived for it
# Paths whose answer depends on their own hit count: counted by path even when the server counts
# only the total of the others (mock_server's count_paths=False, for big load tests).
COUNTED_PREFIXES = ("/flaky/", "/flaky-reset/", "/flaky-retry-after/", "/hit/", "/robots.txt")
SEED = web.AppKey("seed", int)  # with the path, decides every seeded answer
ROBOTS = web.AppKey("robots", str)  # what /robots.txt answers: a ROBOTS_KNOBS name, maybe with ":arg"

MAX_DELAY_MS = 60_000
MAX_BYTES = 1 << 30
MAX_REDIRECTS = 1_000
MAX_FLAKY_FAILURES = 1_000
MAX_SLOW_CHUNKS = 10_000
MAX_BOMB_MIB = 10_240  # 10 GiB of zeros, about 10 MiB on the wire
MAX_GARBAGE_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 366 * 86_400
MAX_RANDOM_LATENCY_MS = 50.0
RANDOM_STATUSES = {200: 90, 500: 5, 503: 5}  # status -> weight
HUGE_LENGTH = 10 << 30
LAST_MODIFIED = datetime(2024, 1, 1, tzinfo=UTC)
CACHE_CONTROL = "max-age=60"
CHUNK_SIZE = 64 * 1024
# Byte i of every /bytes body is i % 256; the chunk is a whole number of 256-byte cycles so that
# slicing it keeps the pattern aligned.
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)
_MIB = 1 << 20
_BOMB_BATCH_MIB = 64  # MiB of zeros per write: about 64 KiB on the wire
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TAIL = r"{rest:(/.*)?}"  # "/ok" + _TAIL accepts "/ok" and "/ok/anything", but not "/okay"
# /ok/.. and /delay/{ms}/.., the load test's paths, as the routes above match them, but on the
# raw request target: a target that spells them otherwise (a percent-escape in "ok", say) does not
# match, and is routed. A server may answer a match with answer_after(ms) without routing it.
PLAIN_LOAD_TARGET = re.compile(r"/(?:ok|delay/(?P<ms>[0-9]{1,5}))(/.*)?")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METHODS = ("GET", "HEAD", "POST")  # every path answers these three


def _int_param(request: web.Request, name: str, low: int, high: int) -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer, got {raw!r}\n") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}, got {value}\n")
    return value


def _random_for(seed: int, path: str) -> random.Random:
    # A str seed is hashed with SHA-512, not hash(): the same in every process and on every run.
    return random.Random(f"{seed} {path}")


def random_outcome(seed: int, path: str) -> tuple[int, float]:
    """(status, latency in ms) that /random answers for `path` (e.g. "/random/a") under `seed`."""
    rng = _random_for(seed, path)
    status = rng.choices(list(RANDOM_STATUSES), weights=list(RANDOM_STATUSES.values()))[0]
    return status, rng.uniform(0.0, MAX_RANDOM_LATENCY_MS)


def _is_early(request: web.Request, n: int) -> bool:
    """True for the first n requests to this exact path (HITS already counts this one)."""
    return request.app[HITS][request.path] <= n


def _hang_up(request: web.Request, *, reset: bool, data: bytes = b"") -> web.Response:
    """Write `data` to the socket as is, then end the connection: closed cleanly, or reset.

    The response returned is never sent: aiohttp finds the connection gone and drops it quietly.
    """
    transport = request.transport
    if transport is not None and not transport.is_closing():
        if data:
            transport.write(data)
        if reset:
            # Linger on, with a zero timeout: close() sends RST instead of FIN.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # after flushing `data`
    return web.Response()


async def _stream(request: web.Request, response: web.StreamResponse, chunks: int | None) -> web.StreamResponse:
    """Send the headers, then `chunks` pattern chunks (None: forever) or until the client leaves."""
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    with suppress(ConnectionError):  # the client left: this handler ends, nothing is logged
        sent = 0
        while chunks is None or sent < chunks:
            await response.write(_PATTERN)
            sent += 1
            await asyncio.sleep(0)  # a client that reads fast must not starve the other ones
    return response


async def answer_after(ms: int) -> web.Response:
    """200 "ok\n" after `ms` milliseconds: /ok/.. (0) and /delay/{ms}/.."""
    if ms:
        await asyncio.sleep(ms / 1000)
    return web.Response(text="ok\n")


async def _ok(request: web.Request) -> web.Response:
    return await answer_after(0)


async def _status(request: web.Request) -> web.Response:
    # 1xx codes are sent as if final; most clients then wait for a final response that never comes.
    code = _int_param(request, "code", 100, 599)
    return web.Response(status=code, text=f"{code}\n")


async def _delay(request: web.Request) -> web.Response:
    # Also /slow-headers: nothing, not even the status line, is sent before the handler returns.
    return await answer_after(_int_param(request, "ms", 0, MAX_DELAY_MS))


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n", 0, MAX_BYTES)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = n  # a known length, not chunked, so clients can check truncation
    await response.prepare(request)
    if request.method != "HEAD":
        with suppress(ConnectionError):
            for start in range(0, n, CHUNK_SIZE):
                await response.write(_PATTERN[: min(CHUNK_SIZE, n - start)])
    return response


async def _redirect(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 0, MAX_REDIRECTS)
    if n == 0:
        return web.Response(text="ok\n")
    return web.Response(status=302, headers={"Location": f"/redirect/{n - 1}"})


async def _slow_body(request: web.Request) -> web.StreamResponse:
    ms = _int_param(request, "ms", 0, MAX_DELAY_MS)
    n = _int_param(request, "n", 0, MAX_SLOW_CHUNKS)
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.content_length = n
    await response.prepare(request)  # a StreamResponse sends its headers here, before any body
    if request.method != "HEAD":
        with suppress(ConnectionError):
            for _ in range(n):
                await asyncio.sleep(ms / 1000)
                await response.write(b".")
    return response


async def _endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    return await _stream(request, response, None)


async def _huge_length(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = HUGE_LENGTH
    return await _stream(request, response, HUGE_LENGTH // CHUNK_SIZE)


@functools.cache
def _gzip_zeros_parts() -> tuple[bytes, bytes, bytes]:
    """(gzip header, one MiB of zeros as a repeatable deflate segment, an empty final block)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(_MIB)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    # A full flush byte-aligns the stream and forgets the history, so every MiB after it
    # compresses to these same bytes, and the first one did too, after the header.
    segment = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    final_block = compressor.flush()[:-8]  # the last 8 bytes are this compressor's CRC and size
    return first[: -len(segment)], segment, final_block


@functools.lru_cache(maxsize=16)
def _zeros_crc32(mib: int) -> int:
    zeros = bytes(_MIB)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return crc


async def _gzip_bomb(request: web.Request) -> web.StreamResponse:
    mib = _int_param(request, "mib", 0, MAX_BOMB_MIB)
    header, segment, final_block = _gzip_zeros_parts()
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
    response.content_length = len(header) + mib * len(segment) + len(final_block) + 8
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    with suppress(ConnectionError):
        await response.write(header)
        batches, rest = divmod(mib, _BOMB_BATCH_MIB)
        for _ in range(batches):
            await response.write(segment * _BOMB_BATCH_MIB)
        await response.write(segment * rest)
        # Only a client that reads it all needs the CRC: 0.3 s per GiB, off the loop, then cached.
        crc = await asyncio.to_thread(_zeros_crc32, mib)
        await response.write(final_block + struct.pack("<II", crc, (mib * _MIB) & 0xFFFFFFFF))
    return response


async def _redirect_loop(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": request.raw_path})


async def _redirect_cycle(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 1, MAX_REDIRECTS)
    i = _int_param(request, "i", 0, n - 1)
    rest = request.match_info["rest"]
    return web.Response(status=302, headers={"Location": f"/redirect-cycle/{n}/{(i + 1) % n}{rest}"})


async def _redirect_to(request: web.Request) -> web.Response:
    url = request.query.get("url", "")
    if not url or any(c in url for c in "\r\n\0"):
        raise web.HTTPBadRequest(text="url must be given, without CR, LF or NUL\n")
    status = request.query.get("status", "302")
    if status not in {str(code) for code in _REDIRECT_STATUSES}:
        raise web.HTTPBadRequest(text=f"status must be one of {sorted(_REDIRECT_STATUSES)}\n")
    return web.Response(status=int(status), headers={"Location": url})


async def _reset(request: web.Request) -> web.Response:
    return _hang_up(request, reset=True)


async def _close(request: web.Request) -> web.Response:
    return _hang_up(request, reset=False)


async def _garbage(request: web.Request) -> web.Response:
    return _hang_up(request, reset=False, data=b"HTTP/1.1 abc\r\n\r\n")


async def _garbage_bytes(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 1, MAX_GARBAGE_BYTES)
    data = _random_for(request.app[SEED], request.path).randbytes(n)
    return _hang_up(request, reset=False, data=data)


async def _bad_headers(request: web.Request) -> web.Response:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nthis line has no colon\r\n\r\nok\n"
    return _hang_up(request, reset=False, data=data)


async def _short_body(request: web.Request) -> web.Response:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789"
    return _hang_up(request, reset=False, data=data)


async def _flaky(request: web.Request) -> web.Response:
    if _is_early(request, _int_param(request, "n", 0, MAX_FLAKY_FAILURES)):
        return web.Response(status=503, text="503\n")
    return web.Response(text="ok\n")


async def _flaky_reset(request: web.Request) -> web.Response:
    if _is_early(request, _int_param(request, "n", 0, MAX_FLAKY_FAILURES)):
        return _hang_up(request, reset=True)
    return web.Response(text="ok\n")


async def _flaky_retry_after(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 0, MAX_FLAKY_FAILURES)
    seconds = _int_param(request, "seconds", 0, MAX_RETRY_AFTER_S)
    if _is_early(request, n):
        return web.Response(status=429, text="429\n", headers={"Retry-After": str(seconds)})
    return web.Response(text="ok\n")


async def _hit(request: web.Request) -> web.Response:
    hit = request.app[HITS][request.path]  # read before the wait: later hits of the path add to it
    await answer_after(_int_param(request, "ms", 0, MAX_DELAY_MS))
    return web.Response(text=f"{hit}\n")


async def _retry_after(request: web.Request) -> web.Response:
    status = _int_param(request, "status", 300, 599)
    seconds = _int_param(request, "seconds", 0, MAX_RETRY_AFTER_S)
    return web.Response(status=status, text=f"{status}\n", headers={"Retry-After": str(seconds)})


async def _retry_after_date(request: web.Request) -> web.Response:
    status = _int_param(request, "status", 300, 599)
    seconds = _int_param(request, "seconds", -MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S)
    when = formatdate(time.time() + seconds, usegmt=True)
    return web.Response(status=status, text=f"{status}\n", headers={"Retry-After": when})


async def _random(request: web.Request) -> web.Response:
    status, latency_ms = random_outcome(request.app[SEED], request.path)
    await asyncio.sleep(latency_ms / 1000)
    return web.Response(status=status, text=f"{status}\n")


async def _etag(request: web.Request) -> web.Response:
    tag = hashlib.sha256(request.path.encode()).hexdigest()[:16]
    # If-None-Match compares weakly (RFC 9110, 13.1.2): W/"x" matches "x".
    matched = any(wanted.value in (tag, "*") for wanted in request.if_none_match or ())
    response = web.Response(status=304) if matched else web.Response(text=f"{request.path}\n")
    response.etag = tag
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


async def _last_modified(request: web.Request) -> web.Response:
    since = request.if_modified_since
    if since is not None and since >= LAST_MODIFIED:
        response = web.Response(status=304)
    else:
        response = web.Response(text=f"{request.path}\n")
    response.last_modified = LAST_MODIFIED
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


_HUGE_PADDING = "# " + "x" * 1021 + "\n"  # 1 KiB comment lines
ROBOTS_FILES = {
    "allow": "User-agent: *\nDisallow:\n",
    "disallow": "User-agent: *\nDisallow: /private/\nAllow: /private/open/\n",
    "wildcard": "User-agent: *\nDisallow: /*.pdf$\nDisallow: /*/draft/\n",
    "agent": "User-agent: crawler\nDisallow: /ok/crawler-only/\n\nUser-agent: *\nDisallow: /\n",
    "huge": "User-agent: *\nDisallow: /early/\n" + _HUGE_PADDING * 600 + "Disallow: /late/\n",
}
ROBOTS_KNOBS = frozenset({"none", "delay", "status", "redirect", "redirects", "slow", "flaky", "reset", *ROBOTS_FILES})
_ROBOTS_ARGS = {"delay": float, "status": int, "redirects": int, "slow": int, "flaky": int}


def robots_knob(knob: str) -> tuple[str, float | int | None]:
    """('delay', 2.0) from 'delay:2'; ValueError for a knob the server does not know."""
    name, _, arg = knob.partition(":")
    try:
        if name not in ROBOTS_KNOBS or bool(arg) != (name in _ROBOTS_ARGS):
            raise ValueError(knob)
        return name, _ROBOTS_ARGS[name](arg) if arg else None
    except ValueError:
        raise ValueError(
            f"unknown robots knob {knob!r}: one of {sorted(ROBOTS_KNOBS)} (delay:S, status:N,"
            " redirects:N, slow:MS, flaky:N take a number)"
        ) from None


async def _robots(request: web.Request) -> web.StreamResponse:
    name, arg = robots_knob(request.app[ROBOTS])
    number = arg if isinstance(arg, int) else 0  # status, redirects, slow and flaky take an int
    if name == "none":
        return web.Response(status=404, text="404\n")
    if name in ROBOTS_FILES:
        return web.Response(text=ROBOTS_FILES[name])
    if name == "delay":
        return web.Response(text=f"User-agent: *\nCrawl-delay: {arg:g}\n" + ROBOTS_FILES["disallow"].split("\n", 1)[1])
    if name == "status":
        return web.Response(status=number, text=f"{arg}\n")
    if name == "redirect":
        return web.Response(status=302, headers={"Location": "/robots/disallow.txt"})
    if name == "redirects":
        return web.Response(status=302, headers={"Location": f"/redirect/{number - 1}"})
    if name == "slow":
        await asyncio.sleep(number / 1000)
        return web.Response(text=ROBOTS_FILES["disallow"])
    if name == "flaky":
        if _is_early(request, number):
            return web.Response(status=500, text="500\n")
        return web.Response(text=ROBOTS_FILES["disallow"])
    return _hang_up(request, reset=True)  # "reset"


async def _robots_file(request: web.Request) -> web.Response:
    text = ROBOTS_FILES.get(request.match_info["name"])
    if text is None:
        raise web.HTTPNotFound(text="no such robots file\n")
    return web.Response(text=text)


ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/ok" + _TAIL, _ok),
    ("/status/{code}", _status),
    ("/delay/{ms}" + _TAIL, _delay),
    ("/capacity-delay/{ms}" + _TAIL, _delay),
    ("/slow-headers/{ms}" + _TAIL, _delay),
    ("/bytes/{n}", _bytes),
    ("/redirect/{n}", _redirect),
    ("/slow-body/{ms}/{n}" + _TAIL, _slow_body),
    ("/endless" + _TAIL, _endless),
    ("/huge-length" + _TAIL, _huge_length),
    ("/gzip-bomb/{mib}", _gzip_bomb),
    ("/redirect-loop" + _TAIL, _redirect_loop),
    ("/redirect-cycle/{n}/{i}" + _TAIL, _redirect_cycle),
    ("/redirect-to", _redirect_to),
    ("/reset" + _TAIL, _reset),
    ("/close" + _TAIL, _close),
    ("/garbage" + _TAIL, _garbage),
    ("/garbage-bytes/{n}" + _TAIL, _garbage_bytes),
    ("/bad-headers" + _TAIL, _bad_headers),
    ("/short-body" + _TAIL, _short_body),
    ("/flaky/{n}" + _TAIL, _flaky),
    ("/flaky-reset/{n}" + _TAIL, _flaky_reset),
    ("/flaky-retry-after/{n}/{seconds}" + _TAIL, _flaky_retry_after),
    ("/retry-after/{status}/{seconds}" + _TAIL, _retry_after),
    ("/retry-after-date/{status}/{seconds}" + _TAIL, _retry_after_date),
    ("/hit/{ms}" + _TAIL, _hit),
    ("/random" + _TAIL, _random),
    ("/etag" + _TAIL, _etag),
    ("/last-modified" + _TAIL, _last_modified),
    ("/robots.txt", _robots),
    ("/robots/{name}.txt", _robots_file),
)


def add_routes(app: web.Application) -> None:
    """Route every path of the table above, for GET, HEAD and POST."""
    for method in METHODS:
        for pattern, handler in ROUTES:
            app.router.add_route(method, pattern, handler)
