"""Name lookups for one worker: through c-ares (aiodns) to the system's resolvers or to those
given with --dns-server; answers kept for their own TTL (up to dns_ttl) in a cache of bounded
size; at most dns_concurrency lookups at once; the same name asked once however many requests
wait for it. A lookup that fails says whether asking again may help (DNSFailure.transient).

Never asks anything but the configured resolvers, and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import aiodns
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult
from pycares import errno as ares

from crawler.errors import UsageError

if TYPE_CHECKING:
    from crawler.settings import Settings

# A name that does not exist is remembered this long at most (a NXDOMAIN's own TTL, the SOA
# minimum, is not handed back by c-ares's getaddrinfo): rows naming a dead host ask about it
# once, not once each.
NEGATIVE_TTL = 60.0
# An answer with a TTL of 0 is still reused this long: a burst of connections to one host asks
# once, not once per connection.
MIN_TTL = 1.0
# The name has no address, or cannot be one: asking again will not change that.
PERMANENT_CODES = frozenset({ares.ARES_ENOTFOUND, ares.ARES_ENODATA, ares.ARES_ENONAME, ares.ARES_EBADNAME})
# c-ares keeps every answer of a channel in a query cache of its own, for the answer's TTL and
# unbounded in size (about 2 KiB a name: 77 MiB after 40 000 names, measured), and pycares offers
# no way to turn it off (ARES_OPT_QUERY_CACHE). So a channel serves this many lookups, then a fresh one takes over and
# the old one is closed, with its cache, once its last lookup has ended.
LOOKUPS_PER_CHANNEL = 1000
# Answered without an address (getaddrinfo's numeric flags), as aiohttp's own resolvers answer.
NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class DNSFailure(OSError):
    """A lookup that failed. `transient`: the resolver failed (SERVFAIL, no answer in time, a
    refusal), so the same question may be answered later; otherwise the name has no address."""

    def __init__(self, name: str, reason: str, *, transient: bool) -> None:
        super().__init__(None, reason)
        self.name = name
        self.transient = transient


@dataclass(slots=True, frozen=True)
class Answer:
    """A name's addresses (IPv4 and IPv6 as text, the family told by a ':'), or the permanent
    failure that stands for it (a NXDOMAIN), until `expires` (on the cache's clock)."""

    addresses: tuple[str, ...]
    expires: float
    failure: DNSFailure | None = None


def cache_key(host: str, family: int) -> str:
    """The name itself for the connector's own lookups (any family, 0): a key of one string, not
    a tuple, is 72 bytes less per cached name; '%' is in no host name."""
    return host if family == 0 else f"{host}%{family}"


def address_family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class NameCache:
    """name -> Answer, at most `size` of them, in the order they were answered: the oldest
    answer is dropped first, when the cache is full, and once it has expired, as a new one comes
    in. Pure: the clock is given.

    In the order answered, not the order used: an answer is good until its TTL is over however
    often it is used, and with every TTL at most `max_ttl` the oldest answer is the first to
    expire or near it, so the cache holds the names answered within the last `max_ttl` and no
    more. Ordered by use, a name asked for a moment before its answer expired sat behind fresher
    answers and stayed, expired, for up to another TTL, so a cache could hold up to twice the
    names met within a TTL.

    Held compactly, as much of a worker's memory at a million URLs over a hundred thousand names
    is this cache: (expires, what was answered), one address kept as itself rather than in a
    tuple, and the Answer made when asked for. About 170 bytes a name besides the name and its
    address (tracemalloc, 100 000 names, one IPv4 address each), against 220 for Answers. An
    OrderedDict, not a dict: a dict's front fills with the holes of the entries dropped there,
    and finding the oldest would scan them (83 us a put at 50 000 names, against 1 us).
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = max(0, size)
        self.clock = clock
        self._answers: OrderedDict[str, tuple[float, str | tuple[str, ...] | DNSFailure]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Answer | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        expires, answered = entry
        if expires <= self.clock():
            del self._answers[key]
            return None
        return _answer(expires, answered)

    def put(self, key: str, addresses: tuple[str, ...], ttl: float, failure: DNSFailure | None = None) -> Answer:
        now = self.clock()
        expires = now + ttl
        if self.size == 0 or ttl <= 0:
            return Answer(addresses, expires, failure)
        answers = self._answers
        answered = failure if failure is not None else addresses[0] if len(addresses) == 1 else addresses
        answers[key] = (expires, answered)
        answers.move_to_end(key)  # a name answered again: its answer is now the newest
        while len(answers) > self.size:
            answers.popitem(last=False)
        # The oldest answers that have expired go too (the oldest first, while they have).
        while (oldest := next(iter(answers))) != key and answers[oldest][0] <= now:
            del answers[oldest]
        return _answer(expires, answered)


def _answer(expires: float, answered: str | tuple[str, ...] | DNSFailure) -> Answer:
    if isinstance(answered, str):
        return Answer((answered,), expires)
    if isinstance(answered, DNSFailure):
        return Answer((), expires, answered)
    return Answer(answered, expires)


def parse_server(text: str) -> str:
    """A --dns-server value, HOST[:PORT] with HOST an IP address ('[v6]:PORT' for a port with
    IPv6), in the form c-ares takes; a clear error otherwise."""
    value = text.strip()
    host: str | None = value
    port: str | None = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            host = None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        address = ipaddress.ip_address(host or "")
        number = int(port) if port is not None else 53
        if not 0 < number < 65536:
            raise ValueError(port)
    except ValueError:
        raise UsageError(
            f"DNS server '{text}' must be an IP address with an optional port, e.g. 127.0.0.1:5353 or [::1]:53."
        ) from None
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"{shown}:{number}"


class CachingResolver(AbstractResolver):
    """aiohttp's resolver for the worker's connector (which keeps no cache of its own)."""

    def __init__(
        self,
        *,
        servers: list[str] | tuple[str, ...] = (),
        timeout: float = 5.0,
        concurrency: int = 64,
        cache_size: int = 100_000,
        max_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servers = [parse_server(server) for server in servers]
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.cache = NameCache(cache_size, clock)
        self._limit = asyncio.Semaphore(max(1, concurrency))
        self._asking: dict[str, asyncio.Future[Answer]] = {}
        self.lookups = 0  # questions sent to a resolver (each name once per TTL, cache permitting)
        # Search domains are not applied: a URL names its host in full, and a name that does
        # not exist would otherwise be asked again under each of resolv.conf's domains. c-ares
        # tries twice within the lookup's timeout, so one lost datagram is not a failure.
        self._options = dict(flags=pycares.ARES_FLAG_NOSEARCH, timeout=max(0.05, timeout / 2), tries=2)
        self._dns = self._channel()
        self._dns_lookups = 0  # lookups the current channel has served
        self._in_flight: dict[aiodns.DNSResolver, int] = {self._dns: 0}
        self.channels = 1  # channels opened so far

    def _channel(self) -> aiodns.DNSResolver:
        return aiodns.DNSResolver(nameservers=self.servers or None, **self._options)

    def _next_channel(self) -> aiodns.DNSResolver:
        """The channel for the next lookup (see LOOKUPS_PER_CHANNEL)."""
        if self._dns_lookups >= LOOKUPS_PER_CHANNEL:
            old = self._dns
            self._dns, self._dns_lookups = self._channel(), 0
            self._in_flight[self._dns] = 0
            self.channels += 1
            if self._in_flight[old] == 0:
                self._retire(old)
        self._dns_lookups += 1
        return self._dns

    def _retire(self, dns: aiodns.DNSResolver) -> None:
        del self._in_flight[dns]
        dns._cleanup()  # close() without its cancel, which has nothing left to cancel; not a coroutine

    @classmethod
    def from_settings(cls, settings: Settings) -> CachingResolver:
        return cls(
            servers=settings.dns_servers,
            timeout=settings.dns_timeout,
            concurrency=settings.dns_concurrency,
            cache_size=settings.dns_cache_size,
            max_ttl=settings.dns_ttl,
        )

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = cache_key(host, int(family))
        answer = self.cache.get(key)
        if answer is None:
            asking = self._asking.get(key)
            if asking is None:  # the first to ask: everyone else waits for this answer
                asking = self._asking[key] = asyncio.ensure_future(self._ask(key, host, int(family)))
                asking.add_done_callback(partial(self._asked, key))
            # Shielded: one request giving up (its timeout) must not cancel the others' answer.
            answer = await asyncio.shield(asking)
        if answer.failure is not None:
            raise answer.failure
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=address_family(address), proto=0, flags=NUMERIC_FLAGS
            )
            for address in answer.addresses
        ]

    def _asked(self, key: str, asking: asyncio.Future[Answer]) -> None:
        self._asking.pop(key, None)
        if not asking.cancelled():
            asking.exception()  # seen here, so a failure nobody waits for any more is not reported

    async def _ask(self, key: str, host: str, family: int) -> Answer:
        async with self._limit:
            self.lookups += 1
            dns = self._next_channel()
            self._in_flight[dns] += 1
            try:
                async with asyncio.timeout(self.timeout):
                    reply = await dns.getaddrinfo(host, family=socket.AddressFamily(family), type=socket.SOCK_STREAM)
            except TimeoutError:
                raise DNSFailure(host, f"no answer within {self.timeout:g}s", transient=True) from None
            except aiodns.error.DNSError as exc:
                code = exc.args[0] if exc.args else None
                reason = exc.args[1] if len(exc.args) > 1 else "lookup failed"
                failure = DNSFailure(host, _reason(code, reason), transient=code not in PERMANENT_CODES)
                if failure.transient:
                    raise failure from None  # not cached: a retry asks again
                return self.cache.put(key, (), min(NEGATIVE_TTL, self.max_ttl), failure)
            finally:
                self._in_flight[dns] -= 1
                if self._in_flight[dns] == 0 and dns is not self._dns:
                    self._retire(dns)
        addresses = []
        ttl = self.max_ttl
        for node in reply.nodes:
            raw = node.addr[0]
            # Interned: the names of one site or CDN share their addresses, and a cache of many
            # names keeps each address once (58 bytes an IPv4 address).
            addresses.append(sys.intern(raw.decode("ascii") if isinstance(raw, bytes) else raw))
            ttl = min(ttl, node.ttl)
        if not addresses:
            failure = DNSFailure(host, "the name has no address", transient=False)
            return self.cache.put(key, (), min(NEGATIVE_TTL, self.max_ttl), failure)
        return self.cache.put(key, tuple(addresses), min(self.max_ttl, max(MIN_TTL, ttl)))

    async def close(self) -> None:
        for asking in list(self._asking.values()):
            asking.cancel()
        for dns in list(self._in_flight):
            await dns.close()
        self._in_flight.clear()


def _reason(code: int | None, text: str) -> str:
    """c-ares's words, with the DNS answer behind them where there is one."""
    named = {
        ares.ARES_ENOTFOUND: "no such name (NXDOMAIN)",
        ares.ARES_ESERVFAIL: "the resolver failed (SERVFAIL)",
        ares.ARES_EREFUSED: "the resolver refused the query (REFUSED)",
        ares.ARES_ETIMEOUT: "no answer from the resolver",
        ares.ARES_ECONNREFUSED: "the resolver could not be reached",
    }
    return named.get(code, text)
