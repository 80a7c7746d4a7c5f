"""A DNS responder on loopback for `crawler bench --hosts N` and the tests: answers A queries for
the names of one zone with one address, and whatever a test's `answer` function decides. Counts
every question it is asked, by name and type.

Answers only what it is asked, on the address it listens on, and never asks anyone else.
The packets are read and written here rather than with dnslib: dnslib's parse and pack cost
190 µs a query on the benchmark machine, and a bench over 100 000 names asks 200 000 of them.
Only the subset of RFC 1035 a stub resolver's question needs is read (tests/test_resolver.py
checks the answers with dnslib).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import struct
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import orjson

A, AAAA = 1, 28
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
_HEADER = struct.Struct("!HHHHHH")
_ANSWER = struct.Struct("!HHHIH")  # name pointer, type, class, TTL, data length


class Question(NamedTuple):
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    raw: bytes  # the question section as sent (its case kept, for resolvers that check it)


@dataclass(slots=True, frozen=True)
class Reply:
    """What to answer: `rcode`, with `addresses` (IPv4 text) for A questions; `silent`: nothing."""

    rcode: int = NOERROR
    addresses: tuple[str, ...] = ()
    ttl: int = 300
    silent: bool = False
    delay: float = 0.0  # seconds before answering


def parse_question(packet: bytes) -> Question | None:
    """The first question of a query, or None for anything else (answers, garbage)."""
    if len(packet) < _HEADER.size:
        return None
    ident, flags, qdcount, *_ = _HEADER.unpack_from(packet)
    if flags & 0x8000 or qdcount < 1:
        return None
    labels, pos = [], _HEADER.size
    while True:
        if pos >= len(packet):
            return None
        length = packet[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:  # a compression pointer has no place in a question
            return None
        labels.append(packet[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if pos + 4 > len(packet):
        return None
    qtype = int.from_bytes(packet[pos : pos + 2], "big")
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    return Question(ident, flags, name, qtype, packet[_HEADER.size : pos + 4])


def reply_packet(question: Question, reply: Reply) -> bytes:
    """The response to `question`: its header and question echoed, then the A records."""
    records = [ipaddress.IPv4Address(a).packed for a in reply.addresses] if question.qtype == A else []
    if reply.rcode != NOERROR:
        records = []
    # QR, the query's opcode and RD, AA (we are the zone's authority), RA (names outside the zone
    # are answered too, as a recursive resolver would), and the rcode.
    flags = 0x8000 | (question.flags & 0x7900) | 0x0400 | 0x0080 | reply.rcode
    parts = [_HEADER.pack(question.id, flags, 1, len(records), 0, 0), question.raw]
    for record in records:
        parts.append(_ANSWER.pack(0xC00C, A, 1, reply.ttl, len(record)))
        parts.append(record)
    return b"".join(parts)


def zone_answer(zone: str, address: str = "127.0.0.1", ttl: int = 300) -> Callable[[Question], Reply]:
    """Every name in `zone` (the zone's own name included) has `address`; others do not exist."""
    suffix = "." + zone.lower().strip(".")

    def answer(question: Question) -> Reply:
        if question.name.endswith(suffix) or question.name == suffix[1:]:
            return Reply(addresses=(address,), ttl=ttl)
        return Reply(rcode=NXDOMAIN)

    return answer


class Responder(asyncio.DatagramProtocol):
    """The protocol: one question in, its reply out (or none), every question counted."""

    def __init__(self, answer: Callable[[Question], Reply]) -> None:
        self.answer = answer
        self.asked: Counter[tuple[str, int]] = Counter()
        self.waiting = 0  # questions whose delayed answer is not sent yet
        self.most_waiting = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (uvloop's is not a subclass of asyncio's class).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        question = parse_question(data)
        if question is None:
            return
        self.asked[question.name, question.qtype] += 1
        reply = self.answer(question)
        if reply.silent:
            return
        if reply.delay > 0:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
            asyncio.get_running_loop().call_later(reply.delay, self._send_late, question, reply, addr)
            return
        assert self.transport is not None  # a datagram arrives only after connection_made
        self.transport.sendto(reply_packet(question, reply), addr)

    def _send_late(self, question: Question, reply: Reply, addr: tuple) -> None:
        self.waiting -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply_packet(question, reply), addr)

    def names_asked(self) -> int:
        return len({name for name, _ in self.asked})


async def start_responder(
    answer: Callable[[Question], Reply], host: str = "127.0.0.1", port: int = 0
) -> tuple[asyncio.DatagramTransport, Responder, str]:
    """Listen on the running loop; returns (transport, responder, 'HOST:PORT'). Close the transport."""
    loop = asyncio.get_running_loop()
    transport, responder = await loop.create_datagram_endpoint(lambda: Responder(answer), local_addr=(host, port))
    bound = transport.get_extra_info("sockname")
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return transport, responder, f"{shown}:{bound[1]}"


async def _serve(zone: str, address: str, ttl: int, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    transport, responder, where = await start_responder(zone_answer(zone, address, ttl), host, port)
    print(f"dns responder listening on {where}", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()
    # What the bench reads once it stops us: the questions asked, and about how many names.
    print(
        orjson.dumps({"queries": sum(responder.asked.values()), "names": responder.names_asked()}).decode(), flush=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crawler.mock.dns_responder", description=__doc__)
    parser.add_argument("--zone", default="bench.test", help="answer every name under this zone")
    parser.add_argument("--address", default="127.0.0.1", help="the address every name has")
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.zone, args.address, args.ttl, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
