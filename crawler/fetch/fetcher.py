"""Fetches one request, one attempt at a time, and describes what happened as an Attempt.

Owns the aiohttp session (connector, timeouts, address policy). Knows nothing of PostgreSQL,
chunks or retries: the worker decides what to do with an attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs
from yarl import URL

from crawler.errors import UsageError
from crawler.fetch.addresses import AddressPolicy
from crawler.fetch.connections import HostConnector, closed_mid_handshake
from crawler.fetch.failures import BodyTooLarge, classify, transient
from crawler.fetch.heap import HeapTrimmer
from crawler.fetch.resolver import CachingResolver
from crawler.fetch.storable import (
    CONTENT_TYPE_CAP,
    ERROR_CAP,
    ETAG_CAP,
    LAST_MODIFIED_CAP,
    REASON_CAP,
    URL_CAP,
    marked,
    storable,
)
from crawler.kinds import ErrorKind
from crawler.settings import Settings

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
# Requests in flight, at most, as a multiple of `concurrency`: the worker adds fetch tasks while
# some requests are slow (worker._widen), and the connector's limit must let them through.
MAX_WIDTH = 4
# How often the freed heap goes back to the system (crawler/fetch/heap.py says why): between two trims
# a worker touches at most what it frees in this long; a trim costs 5-20 ms (0.2 % of the time).
HEAP_TRIM_INTERVAL = 5.0


@dataclass(slots=True)
class Attempt:
    status: int | None = None
    final_url: str | None = None
    error_kind: str | None = None
    error: str | None = None
    elapsed_ms: float = 0.0
    body_bytes: int | None = None
    body_sha256: bytes | None = None
    retry_after: str | None = None
    body: tuple[str | None, bytes] | None = None  # (content type, bytes), with --store-bodies
    etag: str | None = None
    last_modified: str | None = None
    transient: bool = False  # a `dns` failure that may pass if tried again (failures.transient)


class _Flight:
    """One attempt under way, as the timeout watchdog sees it (times from time.perf_counter())."""

    __slots__ = ("task", "started", "progress", "expired")

    def __init__(self, task: asyncio.Task, now: float) -> None:
        self.task = task
        self.started = now
        self.progress = now  # the attempt's start, then the last body read
        self.expired: str | None = None  # why the watchdog ended it


def _request_ssl(settings: Settings) -> bool:
    """The `ssl` argument of every request (part of aiohttp's pool key, see HostConnector)."""
    return False if settings.insecure else True


def tls_context(settings: Settings) -> ssl.SSLContext | bool:
    """What verifies servers' certificates: the system's CAs, plus `ca_file`'s (e.g. a private
    CA, or the one `crawler mock-server --tls` writes); False with `insecure`."""
    if settings.insecure:
        return False
    if not settings.ca_file:
        return True  # aiohttp's own verified context
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"the CA file '{settings.ca_file}' cannot be read as PEM certificates: {exc}.") from None
    return context


def _made_storable(result: Attempt, made: list[str] | None, redirected: bool) -> None:
    """Every string of the answer made storable and printable (crawler.fetch.storable) before it
    reaches the writer: one NUL in a reason phrase used to fail its whole batch's COPY, and the
    worker with it. The error (made storable where it was made) names the fields that were
    changed."""
    if redirected:  # yarl's form of the last Location; without a redirect it is the row's own URL
        result.final_url, altered = storable(result.final_url or "", URL_CAP)
        if altered:
            made = (made or []) + ["final_url"]
    # A validator that is not printable text within its cap is not kept: changed, it would
    # validate nothing (nor be sent back in If-None-Match / If-Modified-Since by a later job).
    # Tested here rather than by storable(): this runs for every answer of a caching job.
    etag, last_modified = result.etag, result.last_modified
    if etag is not None and not (etag.isprintable() and len(etag) <= ETAG_CAP):
        result.etag = None
        made = (made or []) + ["etag"]
    if last_modified is not None and not (last_modified.isprintable() and len(last_modified) <= LAST_MODIFIED_CAP):
        result.last_modified = None
        made = (made or []) + ["last_modified"]
    if result.body is not None and result.body[0] is not None:
        content_type, altered = storable(result.body[0], CONTENT_TYPE_CAP)
        if altered:
            result.body = (content_type, result.body[1])
            made = (made or []) + ["content_type"]
    if made:
        result.error = marked(result.error, made)


def _headers(stored: str | None, validators: dict[str, str] | None) -> dict[str, str] | None:
    headers = orjson.loads(stored) if stored else {}
    if validators:
        headers.update(validators)
    return headers or None


def _to_origin_only(url: URL, headers: dict[str, str], defaults: dict[str, str]) -> tuple:
    """A request middleware that sends a row's own headers (an API key, a cache validator) only to
    the row's origin (scheme, host, port): on a redirect to another origin they are dropped, as
    aiohttp drops Authorization and Cookie; a header the session sets for every request (the
    User-Agent) gets the session's value back. Applied to every hop, so a redirect back to the
    row's origin carries them again."""
    origin = url.origin()

    async def middleware(request: aiohttp.ClientRequest, handler):  # noqa: ANN001 - aiohttp's type
        if request.url.origin() != origin:
            for name in headers:
                request.headers.popall(name, None)
                if name.lower() in defaults:
                    request.headers[name] = defaults[name.lower()]
        return await handler(request)

    return (middleware,)


class Fetcher:
    """`async with Fetcher(settings) as f: attempt = await f.attempt("GET", url)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = AddressPolicy(settings.allow_net)
        self._default_headers = {"user-agent": settings.user_agent}  # sent with every request
        self._session: aiohttp.ClientSession | None = None
        self._flights: set[_Flight] = set()
        self._watchdog: asyncio.Task | None = None
        # The validators are kept only for the cross-job cache: without it they are stored nowhere,
        # and neither read nor made storable.
        self._keeps_validators = settings.cache_ttl > 0 and not settings.no_cache
        # Besides an error or a redirect, the answer's text reaches the ledger only in these.
        self._keeps_text = self._keeps_validators or settings.store_bodies
        self.connector: HostConnector | None = None
        self.resolver: CachingResolver | None = None
        # How often the watchdog looks: a read or total timeout fires up to this much late.
        self.timeouts = settings.timeouts
        self.sweep = min(1.0, max(0.05, min(self.timeouts.read, self.timeouts.total) / 20))
        self.heap = HeapTrimmer(HEAP_TRIM_INTERVAL)
        self.handshakes_cut = 0  # TLS handshakes a connect timeout ended as they completed
        # The event loop's handler of errors before ours (None: its default).
        self._loop_errors: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        verify = tls_context(s)  # a bad CA file fails here, before anything is started
        self.resolver = CachingResolver.from_settings(s)
        self.connector = HostConnector(
            # Idle connections are kept to this many hosts, the longest idle closed first; with
            # idle_hosts = 0 the scheduler closes a host's as soon as it has nothing pending, and
            # this only bounds redirect targets, which it never sees.
            max_idle_hosts=s.idle_hosts or 2 * s.concurrency,
            request_ssl=_request_ssl(s),
            limit=MAX_WIDTH * s.concurrency,  # the worker's fetch tasks are the bound; this backs it up
            limit_per_host=0,
            use_dns_cache=False,  # the resolver caches, by each answer's TTL and bounded in size
            resolver=self.resolver,
            ssl=verify,
            socket_factory=self.policy.socket_factory,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=self.connector,
            # Only the connect timeout is aiohttp's (armed for new connections alone); the read
            # and total timeouts are the watchdog's: aiohttp's cost a timer per request and
            # another re-armed on every read, 7 % of a request's instructions (callgrind).
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect, sock_read=None),
            headers=self._default_headers,
            cookie_jar=aiohttp.DummyCookieJar(),  # rows are independent: no state between them
            max_field_size=16384,
            raise_for_status=False,
        )
        self._watchdog = asyncio.create_task(self._watch())
        loop = asyncio.get_running_loop()
        self._loop_errors = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        watchdog, self._watchdog = self._watchdog, None
        session, self._session = self._session, None
        resolver, self.resolver = self.resolver, None
        self.connector = None
        try:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)  # ended before what it watches closes
        finally:
            try:
                if session is not None:
                    await session.close()
            finally:
                try:
                    if resolver is not None:
                        await resolver.close()  # not the connector's to close: it was given one
                finally:
                    asyncio.get_running_loop().set_exception_handler(self._loop_errors)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's errors, as before, but for uvloop's report of a TLS handshake that a
        connect timeout ended (connections.closed_mid_handshake): the request's outcome says it."""
        if closed_mid_handshake(context):
            self.handshakes_cut += 1
            log.debug("a connect timeout ended a TLS handshake as it completed (%s)", context.get("exception"))
        elif self._loop_errors is not None:
            self._loop_errors(loop, context)
        else:
            loop.default_exception_handler(context)

    def slow_requests(self, after: float) -> int:
        """Attempts under way for longer than `after` seconds."""
        since = time.perf_counter() - after
        return sum(1 for flight in self._flights if flight.started < since)

    def release_host(self, origin: str) -> None:
        """The crawl has nothing more for `origin` for now: close its idle connections."""
        if self.connector is not None:
            self.connector.close_idle(origin)

    async def _watch(self) -> None:
        """End attempts that overran the total timeout, or read nothing for the read timeout
        (counted from the attempt's start until the first body bytes, then between reads), by
        cancelling their task: what aiohttp's own timers do, with one sweep for all of them. Every
        HEAP_TRIM_INTERVAL seconds, the sweep also gives the freed heap back (crawler/fetch/heap.py)."""
        total, read = self.timeouts.total, self.timeouts.read
        while True:
            await asyncio.sleep(self.sweep)
            now = time.perf_counter()
            if self.heap.due(now):
                self.heap.trim(now)
            for flight in self._flights:
                if flight.expired is not None:
                    continue
                if now - flight.started >= total:
                    flight.expired = f"no complete answer within the total timeout ({total:g}s)"
                elif now - flight.progress >= read:
                    flight.expired = f"nothing read for the read timeout ({read:g}s)"
                else:
                    continue
                flight.task.cancel()

    async def attempt(
        self,
        method: str,
        url: str,
        *,
        headers: str | None = None,
        body: bytes | None = None,
        validators: dict[str, str] | None = None,
        encoded: bool = False,
        keep_first: int = 0,
        max_redirects: int | None = None,
    ) -> Attempt:
        """One try at the request; every failure is classified into the Attempt, never raised.
        `headers` is a JSON object as text (as stored with the request); they go to the URL's
        origin only. `encoded`: the URL is as crawler.urls.parse_url makes it to be sent (as the
        ledger stores it), so it goes on the request line as written, not requoted by yarl
        (which would decode reserved escapes such as %2F). `keep_first` (robots.txt): read and
        keep the body's first bytes, up to that many, and ignore the rest rather than fail on it;
        `max_redirects` overrides the setting."""
        assert self._session is not None, "use Fetcher as an async context manager"
        limit = self.settings.max_body_bytes
        started = time.perf_counter()
        result = Attempt()
        made: list[str] | None = None  # the answer's fields made storable
        redirected = False
        task = asyncio.current_task()
        assert task is not None  # fetch is always awaited from a task
        flight = _Flight(task, started)
        self._flights.add(flight)
        try:
            target = URL(url, encoded=True) if encoded else url
            sent_headers = middlewares = None
            if headers or validators:  # a row without headers of its own pays nothing for this
                sent_headers = _headers(headers, validators)
                if sent_headers:
                    middlewares = _to_origin_only(URL(target), sent_headers, self._default_headers)
            async with self._session.request(
                method,
                target,
                allow_redirects=True,
                max_redirects=self.settings.max_redirects if max_redirects is None else max_redirects,
                headers=sent_headers,
                data=body,
                ssl=False if self.settings.insecure else True,
                middlewares=middlewares,
            ) as resp:
                answer = resp.headers
                result.status = resp.status
                # Without a redirect the final URL is the one asked for (already in yarl's form).
                if resp.history:
                    result.final_url, redirected = str(resp.url), True
                else:
                    result.final_url = url
                result.retry_after = answer.get(hdrs.RETRY_AFTER)
                if self._keeps_validators:
                    result.etag = answer.get(hdrs.ETAG)
                    result.last_modified = answer.get(hdrs.LAST_MODIFIED)
                if keep_first:
                    head = bytearray()
                    while len(head) < keep_first and (block := await resp.content.read(READ_SIZE)):
                        flight.progress = time.perf_counter()
                        head += block
                    result.body_bytes = len(head)
                    result.body = (answer.get(hdrs.CONTENT_TYPE), bytes(head[:keep_first]))
                elif limit > 0:
                    declared = resp.content_length
                    if declared is not None and answer.get(hdrs.CONTENT_ENCODING):
                        declared = None  # the size on the wire, not the body's
                    if declared is not None and declared > limit:
                        raise BodyTooLarge(limit)  # refused before a byte is read
                    digest = hashlib.sha256()
                    kept: bytearray | None = bytearray() if self.settings.store_bodies else None
                    size = 0
                    read = resp.content.read
                    # The declared length read, the body is complete: no read only to meet its end.
                    while size != declared and (block := await read(READ_SIZE)):
                        flight.progress = time.perf_counter()
                        size += len(block)
                        if size > limit:  # counted after decompression: a gzip bomb stops here
                            raise BodyTooLarge(limit)
                        digest.update(block)
                        if kept is not None:
                            kept += block
                    result.body_bytes = size
                    result.body_sha256 = digest.digest()
                    if kept is not None:
                        result.body = (answer.get(hdrs.CONTENT_TYPE), bytes(kept))
            if result.status >= 400:
                result.error_kind = ErrorKind.HTTP_STATUS
                reason, altered = storable(resp.reason or "", REASON_CAP)
                if altered:
                    made = ["reason"]
                result.error = f"HTTP {result.status} {reason}".strip()
        except asyncio.CancelledError:
            # Ours (a timeout) is turned into data; any other cancellation goes on up.
            if flight.expired is None or flight.task.uncancel() > 0:
                raise
            result.error_kind, result.error = ErrorKind.TIMEOUT, flight.expired
        except Exception as exc:  # every failure becomes data; see failures.classify
            result.error_kind, detail = classify(exc)
            result.transient = transient(exc)
            # A detail may quote the server: a header line, a Location, a status line.
            result.error, altered = storable(detail, ERROR_CAP)
            if altered:
                made = ["error"]
        finally:
            self._flights.discard(flight)
        if made or redirected or self._keeps_text:  # else nothing of the server's is kept
            _made_storable(result, made, redirected)
        result.elapsed_ms = (time.perf_counter() - started) * 1000.0
        return result
