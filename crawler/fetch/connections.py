"""The worker's connection pool: aiohttp's TCPConnector, made to give a host's idle connections
back as soon as the crawl has nothing more for that host, and to keep idle connections to only
so many hosts at once.

Why: aiohttp keeps every released keep-alive connection for its keep-alive timeout (15 s),
whatever the crawl will ask next. On a list spread over many hosts nearly every one of those
connections waits for a request that never comes: one process, 30 000 URLs over 30 000 TLS
hosts, peaked at 847 MiB with them and at 85 MiB closing them. Closing every connection after
its answer instead would cost a single busy host its reuse. Only the per-host scheduler knows
when a host has nothing pending, so it tells the connector (close_idle).

aiohttp has no public call to close one host's idle connections: this reaches into the pool
(`_conns`, keyed by ConnectionKey) and `_release`, as aiohttp 3.12 to 3.14 lay them out;
tests/test_connections.py counts connections on the server side and fails if that changes.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from yarl import URL

DEFAULT_PORTS = {"http": 80, "https": 443}


def closed_mid_handshake(context: dict[str, Any]) -> bool:
    """Whether an event loop error is uvloop's when a connect timeout ends a TLS handshake just as
    it completes: its create_connection closes the TCP transport on the cancellation without
    telling the SSL protocol, whose next step flushes the client's last handshake message into
    the closed transport and reports "Fatal error on SSL protocol: unable to perform operation
    on <TCPTransport closed=True ...>; the handler is closed". The request has its outcome
    already (a connect timeout); nothing else is affected. Seen once in 1 000 000 TLS requests
    on a loaded machine; tests/test_handshake_timeout.py makes it happen on loopback."""
    exc = context.get("exception")
    return (
        context.get("message") == "Fatal error on SSL protocol"
        and isinstance(exc, RuntimeError)
        and "TCPTransport closed=True" in str(exc)
        and "the handler is closed" in str(exc)
    )


class HostConnector(aiohttp.TCPConnector):
    """A TCPConnector that closes a host's idle connections on request, and the oldest host's
    when more than `max_idle_hosts` hosts have idle connections. `request_ssl` is the `ssl`
    argument every request is made with: part of aiohttp's pool key."""

    def __init__(self, *, max_idle_hosts: int, request_ssl: Any = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_idle_hosts = max(0, max_idle_hosts)
        self.request_ssl = request_ssl
        self.closed_idle = 0  # connections closed here, for the tests and the curious

    def _release(self, key: ConnectionKey, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        # The pool is a dict in the order hosts first had an idle connection: the first key is
        # the host that has waited longest (a key leaves when its last idle connection is taken).
        while len(self._conns) > self.max_idle_hosts:
            self._close_key(next(iter(self._conns)))

    def close_idle(self, origin: str) -> int:
        """Close the idle connections to `origin` ('https://example.com:8443', as
        crawler.fetch.hosts.host_of gives it); connections in use are left alone. Returns how many."""
        if not self._conns:
            return 0
        url = URL(origin)
        scheme = url.scheme
        host = url.raw_host
        if host is None:
            return 0
        port = url.port or DEFAULT_PORTS.get(scheme)
        key = ConnectionKey(host, port, scheme == "https", self.request_ssl, None, None, None, None)
        return self._close_key(key)

    def _close_key(self, key: ConnectionKey) -> int:
        conns = self._conns.pop(key, None)
        if not conns:
            return 0
        for protocol, _ in conns:
            transport = protocol.transport
            protocol.close()
            if key.is_ssl and not self._cleanup_closed_disabled:
                self._cleanup_closed_transports.append(transport)  # as aiohttp does on release
        self.closed_idle += len(conns)
        return len(conns)
