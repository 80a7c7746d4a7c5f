"""Error classification: real failures produced on loopback (refused, reset, garbage, silence,
redirect loops, an unresolvable name) and the rest built by hand, each mapped to a stable kind with
a readable detail. Nothing here sends a packet beyond 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
import types
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from crawler.fetch.addresses import AddressPolicy, BlockedAddress
from crawler.fetch.failures import BodyTooLarge, classify, transient
from crawler.fetch.resolver import DNSFailure
from crawler.kinds import ErrorKind

pytestmark = pytest.mark.one_server

WAIT = 5.0  # seconds: the bound on every network wait in this file

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def assert_readable(kind: str, detail: str) -> None:
    assert isinstance(kind, ErrorKind)
    assert isinstance(detail, str) and detail.strip(), f"empty detail for {kind}"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A bare TCP server on 127.0.0.1 that behaves as `handler` says; yields its base URL. On exit
    every connection is closed and every handler released."""
    release = asyncio.Event()
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
            await release.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        release.set()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the released handlers finish


async def failure_of(url: str, **request: object) -> BaseException:
    """The exception a GET of `url` raises (reading the whole body), within WAIT seconds."""
    timeout = request.pop("timeout", aiohttp.ClientTimeout(total=WAIT))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with asyncio.timeout(WAIT + 1):
            try:
                async with session.get(url, **request) as response:
                    await response.read()
            except Exception as exc:  # the point: whatever aiohttp raises for real
                return exc
    pytest.fail(f"GET {url} did not fail")


async def read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


# --- real failures on loopback ----------------------------------------------------------------


async def test_a_refused_connection_is_connect() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exc = await failure_of(f"http://127.0.0.1:{port}/")
    assert isinstance(exc, aiohttp.ClientConnectorError)
    kind, detail = classify(exc)
    assert kind == "connect"
    assert f"127.0.0.1:{port}" in detail
    assert_readable(kind, detail)


async def test_a_server_that_closes_without_answering_is_reset() -> None:
    async def close_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async with raw_server(close_after_request) as url:
        exc = await failure_of(url)
    assert isinstance(exc, aiohttp.ServerDisconnectedError)
    kind, detail = classify(exc)
    assert kind == "reset"
    assert_readable(kind, detail)


async def test_a_server_that_closes_as_soon_as_it_accepts_is_reset() -> None:
    # Unread request bytes make the kernel answer with RST: a reset, or a disconnect, by timing.
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with raw_server(close_at_once) as url:
        exc = await failure_of(url)
    kind, detail = classify(exc)
    assert kind == "reset", repr(exc)
    assert_readable(kind, detail)


@pytest.mark.parametrize(
    "answer",
    [
        b"GARBAGE\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["garbage-status-line", "bad-status-code", "bad-content-length", "bad-chunk"],
)
async def test_a_malformed_response_is_protocol(answer: bytes) -> None:
    async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with raw_server(answer_garbage) as url:
        exc = await failure_of(url)
    kind, detail = classify(exc)
    assert kind == "protocol", repr(exc)
    assert_readable(kind, detail)


async def test_a_body_cut_short_is_protocol() -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a little")
        await writer.drain()
        writer.close()

    async with raw_server(truncate) as url:
        exc = await failure_of(url)
    assert isinstance(exc, aiohttp.ClientPayloadError)
    kind, detail = classify(exc)
    assert kind == "protocol"
    assert_readable(kind, detail)


async def test_a_server_that_never_answers_is_timeout() -> None:
    async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then wait, with the connection open, until released

    async with raw_server(stay_silent) as url:
        exc = await failure_of(url, timeout=aiohttp.ClientTimeout(total=WAIT, sock_read=0.2))
    assert isinstance(exc, asyncio.TimeoutError)
    kind, detail = classify(exc)
    assert kind == "timeout"
    assert_readable(kind, detail)


@pytest.fixture
async def redirect_server(aiohttp_server):
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def to_ftp(request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://files.example.invalid/x")  # refused by aiohttp before any connect

    app = web.Application()
    app.router.add_get("/loop", loop)
    app.router.add_get("/to-ftp", to_ftp)
    return await aiohttp_server(app)


async def test_a_redirect_loop_is_too_many_redirects(redirect_server) -> None:
    exc = await failure_of(str(redirect_server.make_url("/loop")), max_redirects=3)
    assert isinstance(exc, aiohttp.TooManyRedirects)
    kind, detail = classify(exc)
    assert kind == "too_many_redirects"
    assert detail == f"more than {len(exc.history)} redirects"


async def test_a_redirect_to_a_non_http_url_is_invalid_url(redirect_server) -> None:
    exc = await failure_of(str(redirect_server.make_url("/to-ftp")))
    assert isinstance(exc, aiohttp.NonHttpUrlRedirectClientError)
    kind, detail = classify(exc)
    assert kind == "invalid_url"
    assert "ftp://files.example.invalid/x" in detail


async def test_a_blocked_address_is_blocked() -> None:
    policy = AddressPolicy()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=policy.socket_factory),
        timeout=aiohttp.ClientTimeout(total=WAIT),
    ) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get("http://127.0.0.1:9/")
    kind, detail = classify(caught.value)
    assert kind == "blocked"
    assert "127.0.0.1" in detail and "loopback" in detail
    assert_readable(kind, detail)


@pytest.mark.parametrize("url", ["not a url", "http://", "http://[::1/"])
async def test_an_unusable_url_is_invalid_url(url: str) -> None:
    exc = await failure_of(url)
    assert isinstance(exc, aiohttp.InvalidURL)
    kind, detail = classify(exc)
    assert kind == "invalid_url"
    assert_readable(kind, detail)


async def test_a_request_to_a_non_http_scheme_is_invalid_url() -> None:
    exc = await failure_of("ftp://files.example.invalid/x")  # refused by aiohttp before any lookup
    assert isinstance(exc, aiohttp.NonHttpUrlClientError)
    assert classify(exc)[0] == "invalid_url"


# --- DNS --------------------------------------------------------------------------------------


class NxdomainServer(asyncio.DatagramProtocol):
    """A DNS server on loopback that answers every question with NXDOMAIN, so that a real resolver
    (c-ares, as the fetcher uses) fails for real without a query leaving the machine."""

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.queries = 0

    def datagram_received(self, query: bytes, addr: tuple) -> None:
        self.queries += 1
        end = 12  # after the header: the question's name, label by label, then type and class
        while query[end]:
            end += query[end] + 1
        end += 5
        flags = 0x8183  # a response, recursion desired and available, rcode 3 (NXDOMAIN)
        self.transport.sendto(query[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + query[12:end], addr)


@pytest.fixture
async def loopback_resolver() -> AsyncIterator[aiohttp.AsyncResolver]:
    import aiodns  # noqa: F401  a dependency of the crawler: its absence is a failure, not a skip

    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(NxdomainServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    resolver = aiohttp.AsyncResolver(nameservers=["127.0.0.1"], udp_port=port, tcp_port=port, timeout=1, tries=1)
    try:
        yield resolver
    finally:
        await resolver.close()
        transport.close()


async def test_an_unresolvable_name_is_dns(loopback_resolver) -> None:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=loopback_resolver), timeout=aiohttp.ClientTimeout(total=WAIT)
    ) as session:
        # The resolver asked is the NXDOMAIN server above on 127.0.0.1, which answers at once.
        async with asyncio.timeout(WAIT):
            with pytest.raises(aiohttp.ClientConnectorError) as caught:
                await session.get("http://no-such-host.invalid/")
    assert isinstance(caught.value, aiohttp.ClientConnectorDNSError)
    kind, detail = classify(caught.value)
    assert kind == "dns"
    assert "no-such-host.invalid" in detail
    assert_readable(kind, detail)


# --- built by hand ----------------------------------------------------------------------------

URL = yarl.URL("http://example.invalid/")
REQUEST = aiohttp.RequestInfo(URL, "GET", CIMultiDictProxy(CIMultiDict()), URL)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (BodyTooLarge(1024), "body_too_large"),
        (aiohttp.TooManyRedirects(REQUEST, ()), "too_many_redirects"),  # no history: still readable
        (aiohttp.InvalidURL("http://exa mple.com/"), "invalid_url"),
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("Timeout on reading data from socket"), "timeout"),
        (aiohttp.ServerDisconnectedError(), "reset"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "reset"),
        (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
        (aiohttp.ClientOSError(errno.ENETUNREACH, "Network is unreachable"), "connect"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), "protocol"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "protocol"),
        (RuntimeError("something broke"), "internal"),
        (RuntimeError(), "internal"),
        (KeyError("x"), "internal"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value,
)
def test_exceptions_are_classified_by_kind(exc: BaseException, kind: str) -> None:
    got_kind, detail = classify(exc)
    assert got_kind == kind
    assert_readable(got_kind, detail)


def test_body_too_large_says_the_limit() -> None:
    assert classify(BodyTooLarge(1024)) == ("body_too_large", "body larger than 1024 bytes")


def test_an_internal_error_names_the_exception_and_its_message() -> None:
    assert classify(RuntimeError("boom")) == ("internal", "RuntimeError: boom")
    assert classify(RuntimeError("  ")) == ("internal", "RuntimeError")


def test_a_bare_timeout_reads_timed_out() -> None:
    assert classify(TimeoutError()) == ("timeout", "timed out")


MAKERS: list[Callable[[str], BaseException]] = [
    RuntimeError,
    ValueError,
    KeyError,
    aiohttp.ClientError,
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ServerTimeoutError,
    aiohttp.InvalidURL,
    lambda text: OSError(errno.EIO, text),
    lambda text: ConnectionResetError(errno.ECONNRESET, text),
    lambda text: aiohttp.ClientOSError(errno.ECONNREFUSED, text),
    lambda text: aiohttp.ClientOSError(errno.ECONNRESET, text),
    lambda text: TimeoutError(text),
    lambda text: BodyTooLarge(len(text)),
]


@given(st.sampled_from(MAKERS), st.text())
def test_every_classification_is_a_known_kind_with_a_non_empty_detail(make, text: str) -> None:
    kind, detail = classify(make(text))
    assert_readable(kind, detail)


@pytest.mark.parametrize(
    ("os_error", "is_transient"),
    [
        (DNSFailure("a.test", "no such name (NXDOMAIN)", transient=False), False),
        (DNSFailure("a.test", "the resolver failed (SERVFAIL)", transient=True), True),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
    ],
)
def test_a_dns_failure_is_dns_and_transient_only_when_the_resolver_failed(os_error, is_transient) -> None:
    key = ConnectionKey("a.test", 80, False, True, None, None, None, None)
    exc = aiohttp.ClientConnectorDNSError(key, os_error)
    kind, detail = classify(exc)
    assert kind == "dns" and "a.test" in detail
    assert transient(exc) is is_transient
    assert not transient(aiohttp.ServerDisconnectedError()) and not transient(TimeoutError())


# --- every branch, word for word ----------------------------------------------------------------

KEY = types.SimpleNamespace(host="a.test", port=8080, ssl=True, is_ssl=True)  # a connection's key


BLOCKED = BlockedAddress("10.0.0.1", "private").strerror


def connector_error(os_error: Exception) -> aiohttp.ClientConnectorError:
    return aiohttp.ClientConnectorError(KEY, os_error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            connector_error(OSError(errno.EHOSTUNREACH, "No route to host")),
            ("connect", "cannot connect to a.test:8080: No route to host"),
        ),
        (connector_error(OSError(errno.EHOSTUNREACH, "")), ("connect", "cannot connect to a.test:8080: [Errno 113] ")),
        (connector_error(TimeoutError()), ("timeout", "connecting to a.test:8080 timed out")),
        (
            connector_error(PermissionError(errno.EACCES, "address 10.0.0.1 not allowed (see --allow-net)")),
            ("blocked", "a.test: address 10.0.0.1 not allowed (see --allow-net)"),
        ),
        (
            connector_error(PermissionError(errno.EPERM, "address 10.0.0.1 not allowed (see --allow-net)")),
            ("connect", "cannot connect to a.test:8080: address 10.0.0.1 not allowed (see --allow-net)"),
        ),
        (
            connector_error(PermissionError(errno.EACCES, "Permission denied")),
            ("connect", "cannot connect to a.test:8080: Permission denied"),
        ),
        (connector_error(PermissionError(errno.EACCES, "")), ("connect", "cannot connect to a.test:8080: [Errno 13] ")),
        (connector_error(BlockedAddress("10.0.0.1", "private")), ("blocked", f"a.test: {BLOCKED}")),
        (
            aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            ("dns", "cannot resolve a.test: Name or service not known"),
        ),
        (
            aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(socket.EAI_NONAME, "")),
            ("dns", f"cannot resolve a.test: [Errno {socket.EAI_NONAME}] "),
        ),
        (ssl.SSLError(1, "wrong version"), ("tls", "SSLError: wrong version")),
        (aiohttp.TooManyRedirects(REQUEST, (1, 2, 3)), ("too_many_redirects", "more than 3 redirects")),
        (
            aiohttp.TooManyRedirects(REQUEST, ()),
            ("too_many_redirects", "TooManyRedirects: 0, message='', url='http://example.invalid/'"),
        ),
        (aiohttp.InvalidURL("http://exa mple.com/"), ("invalid_url", "InvalidURL: http://exa mple.com/")),
        (aiohttp.NonHttpUrlClientError("ftp://a/"), ("invalid_url", "NonHttpUrlClientError: ftp://a/")),
        (
            aiohttp.InvalidUrlRedirectClientError("http://[x/", "bad"),
            ("invalid_url", "redirect to an unsupported URL: http://[x/ - bad"),
        ),
        (TimeoutError("slow"), ("timeout", "TimeoutError: slow")),
        (aiohttp.ServerDisconnectedError(), ("reset", "server closed the connection before answering")),
        (
            ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
            ("reset", "ConnectionResetError: [Errno 104] Connection reset by peer"),
        ),
        (aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"), ("reset", "ClientOSError: [Errno 32] Broken pipe")),
        (
            aiohttp.ClientOSError(errno.ENETUNREACH, "Network is unreachable"),
            ("connect", "ClientOSError: [Errno 101] Network is unreachable"),
        ),
        (aiohttp.ClientPayloadError("cut short"), ("protocol", "ClientPayloadError: cut short")),
        (aiohttp.ClientError("weird"), ("protocol", "ClientError: weird")),
        (ValueError("v"), ("protocol", "ValueError: v")),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_each_failure_has_its_kind_and_its_exact_detail(exc: BaseException, expected: tuple[str, str]) -> None:
    assert classify(exc) == expected


def test_a_certificate_error_is_tls_and_names_the_host() -> None:
    exc = aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError("certificate verify failed"))
    kind, detail = classify(exc)
    assert kind == "tls"
    assert detail.startswith("ClientConnectorCertificateError: ") and "a.test:8080" in detail


def test_an_ssl_error_at_connect_is_tls() -> None:
    kind, detail = classify(aiohttp.ClientSSLError(KEY, ssl.SSLError("bad")))
    assert kind == "tls" and detail.startswith("ClientSSLError: ")
