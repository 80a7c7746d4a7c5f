"""The address policy: which resolved addresses a request may connect to, checked in the socket
factory aiohttp's connector calls for every connection. Public addresses appear here only as values;
nothing but 127.0.0.1 / ::1 is ever contacted."""

from __future__ import annotations

import csv
import errno
import ipaddress
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from crawler.errors import UsageError
from crawler.fetch import addresses
from crawler.fetch.addresses import REFUSED_RANGES, AddressPolicy, BlockedAddress, embedded_ipv4, parse_networks
from crawler.fetch.failures import classify
from crawler.fetch.resolver import CachingResolver

pytestmark = pytest.mark.one_server

# --- refusal, case by case --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("169.254.0.1", "link-local (cloud metadata)"),
        ("0.0.0.0", "this-network"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),  # a scoped address as getaddrinfo spells it
        ("fc00::1", "private (unique local)"),
        ("ff02::1", "multicast"),
        # IPv4-mapped IPv6 reaches the IPv4 address: judged as that address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
    ],
)
def test_special_addresses_are_refused_with_the_label_of_their_range(address: str, label: str) -> None:
    assert AddressPolicy().refusal(address) == label


@pytest.mark.parametrize("address", ["100.100.100.200", "fd00:ec2::254"])
def test_cloud_metadata_addresses_are_refused(address: str) -> None:
    assert AddressPolicy().refusal(address) is not None


@pytest.mark.parametrize("address", ["100.100.100.200", "fd00:ec2::254"])
def test_cloud_metadata_addresses_are_labelled_cloud_metadata(address: str) -> None:
    assert AddressPolicy().refusal(address) == "cloud metadata"


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().refusal(address) is None


def test_a_scoped_address_as_getaddrinfo_gives_it_is_judged_by_its_address() -> None:
    assert AddressPolicy().refusal("fe80::1%eth0") == "link-local"
    assert AddressPolicy().refusal("::ffff:127.0.0.1%1") == "loopback"
    assert AddressPolicy(["fe80::/10"]).refusal("fe80::1%eth0") is None


def test_refusal_accepts_ip_address_objects() -> None:
    policy = AddressPolicy()
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert policy.refusal(ipaddress.ip_address("8.8.8.8")) is None


# --- IPv6 forms that carry an IPv4 address ------------------------------------------------------

# 2001:0:4136:e378:8000:63bf:f5ff:fffe is Teredo with the client 10.0.0.1 (the last 32 bits
# inverted: ~0xf5fffffe == 0x0a000001); ...:3fff:fffe is the client 192.0.0.1.
_TEREDO_10_0_0_1 = "2001:0:4136:e378:8000:63bf:f5ff:fffe"


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("64:ff9b::a00:1", "private (NAT64 of 10.0.0.1)"),
        ("64:ff9b::7f00:1", "loopback (NAT64 of 127.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata) (NAT64 of 169.254.169.254)"),
        ("64:ff9b:1::a00:1", "private (NAT64 local-use of 10.0.0.1)"),
        ("64:ff9b:1:2::808:808", "NAT64 local-use"),  # not globally reachable, whatever it carries
        ("2002:a00:1::1", "private (6to4 of 10.0.0.1)"),
        ("2002:7f00:1::", "loopback (6to4 of 127.0.0.1)"),
        ("2002:808:808::1", "6to4"),  # relayed: refused whatever it carries
        (_TEREDO_10_0_0_1, "private (Teredo of 10.0.0.1)"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "Teredo"),  # client 8.8.8.8
        ("::a00:1", "private (IPv4-compatible of 10.0.0.1)"),
        ("::127.0.0.1", "loopback (IPv4-compatible of 127.0.0.1)"),
        ("::ffff:a00:1", "private"),  # IPv4-mapped: it is the IPv4 address
        ("fec0::1", "site-local (deprecated)"),
        ("2001:db8::1", "documentation"),
        ("192.0.2.1", "documentation"),
        ("192.0.0.8", "IETF protocol assignments"),
    ],
)
def test_an_address_that_carries_a_refused_ipv4_address_is_refused(address: str, label: str) -> None:
    assert AddressPolicy().refusal(address) == label


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "::808:808", "::ffff:8.8.8.8", "192.0.0.9", "2001:3::1"])
def test_an_address_that_carries_a_public_ipv4_address_or_is_an_exception_is_allowed(address: str) -> None:
    assert AddressPolicy().refusal(address) is None


@pytest.mark.parametrize(
    "address", ["64:ff9b::a00:1", "64:ff9b:1::a00:1", "2002:a00:1::1", _TEREDO_10_0_0_1, "::a00:1", "::ffff:10.0.0.1"]
)
def test_allow_net_of_an_ipv4_network_allows_the_forms_carrying_it(address: str) -> None:
    assert AddressPolicy(["10.0.0.0/8"]).refusal(address) is None
    assert AddressPolicy(["10.0.0.2/32"]).refusal(address) is not None


def test_embedded_ipv4_names_the_form_and_the_address() -> None:
    ip = ipaddress.IPv6Address
    assert embedded_ipv4(ip(_TEREDO_10_0_0_1)) == ("Teredo", ipaddress.IPv4Address("10.0.0.1"))
    assert embedded_ipv4(ip("2002:c000:201::")) == ("6to4", ipaddress.IPv4Address("192.0.2.1"))
    assert embedded_ipv4(ip("::1")) is None and embedded_ipv4(ip("::")) is None
    assert embedded_ipv4(ip("2606:4700::1111")) is None
    # The IPv4-compatible form's edges: ::2 is the first address it carries, and past ::ffff:ffff
    # the top 96 bits are no longer zero (::1:7f00:1 carries nothing, and is not refused for it).
    assert embedded_ipv4(ip("::2")) == ("IPv4-compatible", ipaddress.IPv4Address("0.0.0.2"))
    assert AddressPolicy().refusal("::2") == "this-network (IPv4-compatible of 0.0.0.2)"
    assert embedded_ipv4(ip("::ffff:ffff")) == ("IPv4-compatible", ipaddress.IPv4Address("255.255.255.255"))
    assert embedded_ipv4(ip("::1:7f00:1")) is None
    assert AddressPolicy().refusal("::1:7f00:1") is None


def test_the_lookup_table_of_each_version_holds_its_ranges_in_order() -> None:
    # Built once at import: the lookups above use the table as it was built then, so it is
    # checked here against the ranges themselves, each one's first and last address.
    for version in (4, 6):
        ranges = [(ipaddress.ip_network(cidr), label) for cidr, label in REFUSED_RANGES]
        ranges = [(net, label) for net, label in ranges if net.version == version]
        table = addresses._table(version)
        assert len(table) == len(ranges)
        for (network, mask, label), (net, expected) in zip(table, ranges, strict=True):
            assert label == expected
            first, last = int(net.network_address), int(net.broadcast_address)
            assert first & mask == network and last & mask == network  # the range's own addresses
            assert (first - 1) & mask != network and (last + 1) & mask != network  # and no more


# --- --allow-net ------------------------------------------------------------------------------


def test_allowing_a_single_address_allows_exactly_that_address() -> None:
    policy = AddressPolicy(["127.0.0.1/32"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same address, IPv4-mapped
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("::1") == "loopback"


def test_allowing_a_network_allows_only_that_network() -> None:
    policy = AddressPolicy(["10.0.0.0/8"])
    assert policy.refusal("10.1.2.3") is None
    assert policy.refusal("192.168.1.1") == "private"
    assert policy.refusal("127.0.0.1") == "loopback"


def test_allowing_an_ipv6_network_does_not_allow_ipv4() -> None:
    policy = AddressPolicy(["::1/128"])
    assert policy.refusal("::1") is None
    assert policy.refusal("127.0.0.1") == "loopback"


def test_parse_networks_accepts_host_bits_and_surrounding_spaces() -> None:
    assert parse_networks([" 10.1.2.3/8 ", "::1"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@pytest.mark.parametrize("cidr", ["not-a-network", "10.0.0.0/33", "300.1.1.1/32", "", "fe80::/129"])
def test_a_bad_allow_net_is_a_usage_error_naming_it(cidr: str) -> None:
    with pytest.raises(UsageError) as caught:
        AddressPolicy(["127.0.0.1/32", cidr])
    message = str(caught.value)
    assert f"'{cidr}'" in message and "--allow-net" in message
    assert message.endswith(".")


# --- the independent oracle: IANA's registries as data, and Python's ipaddress ---------------

_IANA = Path(__file__).parent / "data" / "iana_special_purpose_addresses.csv"


def _iana_entries() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    lines = [line for line in _IANA.read_text().splitlines() if not line.startswith("#")]
    return [(ipaddress.ip_network(row["block"]), row["globally_reachable"]) for row in csv.DictReader(lines)]


IANA = _iana_entries()


def iana_reachable(ip) -> str | None:
    """The "Globally Reachable" of the most specific registry entry holding ip, or None."""
    holding = [(net.prefixlen, reachable) for net, reachable in IANA if net.version == ip.version and ip in net]
    return max(holding)[1] if holding else None


def carried_ipv4(ip):
    """The IPv4 address an IPv6 address carries, worked out with ipaddress's own properties."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client is the destination
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
        return low
    if ip in ipaddress.ip_network("::/96") and int(ip) > 1:
        return low  # IPv4-compatible (deprecated)
    return None


def oracle_refuses(ip, allowed=()) -> bool:
    """Whether an address must be refused: it, or the IPv4 address it carries, is not globally
    reachable, unless it or that IPv4 address is in an allowed network."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return oracle_refuses(ip.ipv4_mapped, allowed)
    carried = carried_ipv4(ip)
    if any(ip in net for net in allowed if net.version == ip.version):
        return False
    if carried is not None and any(carried in net for net in allowed if net.version == 4):
        return False
    if carried is not None and oracle_refuses(carried):
        return True
    reachable = iana_reachable(ip)
    if reachable is not None:
        return reachable != "True"
    if ip.is_multicast:
        return True  # no unicast destination, though ipaddress calls 224.0.0.1 global
    if ip.version == 6 and ip.is_site_local:
        return True  # fec0::/10, deprecated (RFC 3879), not in the registry
    return not ip.is_global


def test_the_oracle_data_has_the_registries_entries() -> None:
    blocks = {str(net) for net, _ in IANA}
    assert {"192.0.0.9/32", "2002::/16", "2001::/32", "64:ff9b:1::/48", "::ffff:0:0/96"} <= blocks
    assert all(reachable in ("True", "False", "N/A") for _, reachable in IANA)


def _in(net: ipaddress.IPv4Network | ipaddress.IPv6Network, offset: int):
    return net.network_address + offset % net.num_addresses


_IANA_BLOCKS = [net for net, _ in IANA] + [ipaddress.ip_network(n) for n in ("224.0.0.0/4", "ff00::/8", "fec0::/10")]
_SPECIAL = st.builds(_in, st.sampled_from(_IANA_BLOCKS), st.integers(0, 2**128))
_V4 = st.one_of(
    st.ip_addresses(v=4),
    st.builds(_in, st.sampled_from([n for n in _IANA_BLOCKS if n.version == 4]), st.integers(0, 2**32)),
)


def _embed(form: str, v4: ipaddress.IPv4Address, noise: int) -> ipaddress.IPv6Address:
    n = int(v4)
    if form == "mapped":
        return ipaddress.IPv6Address((0xFFFF << 32) | n)
    if form == "compatible":
        return ipaddress.IPv6Address(n)
    if form == "nat64":
        return ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | n)
    if form == "nat64-local":
        return ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b:1::")) | (noise & (0xFFFF << 64)) | n)
    if form == "6to4":
        return ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | (noise & ((1 << 80) - 1)))
    # Teredo: 2001:0:<server>:<flags>:<port>:<client inverted>
    return ipaddress.IPv6Address((0x20010000 << 96) | (noise & ((1 << 96) - (1 << 32))) | (~n & 0xFFFFFFFF))


_EMBEDDING = st.builds(
    _embed,
    st.sampled_from(["mapped", "compatible", "nat64", "nat64-local", "6to4", "teredo"]),
    _V4,
    st.integers(0, 2**128),
)
ANY_ADDRESS = st.one_of(st.ip_addresses(), _SPECIAL, _EMBEDDING)


@settings(max_examples=3000)
@given(ANY_ADDRESS)
def test_refusal_agrees_with_the_oracle(ip) -> None:
    assert (AddressPolicy().refusal(ip) is not None) == oracle_refuses(ip), ip
    assert (AddressPolicy().refusal(str(ip)) is not None) == oracle_refuses(ip), ip


@st.composite
def allow_lists(draw, ip):
    """Networks to allow: around the address, around the IPv4 address it carries, or elsewhere."""
    carried = carried_ipv4(ip)
    candidates = [ip] + ([carried] if carried is not None else []) + [draw(st.ip_addresses())]
    networks = []
    for address in draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3)):
        prefix = draw(st.integers(0, address.max_prefixlen))
        networks.append(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    return networks


@settings(max_examples=1000)
@given(ANY_ADDRESS, st.data())
def test_allow_net_agrees_with_the_oracle(ip, data) -> None:
    allowed = data.draw(allow_lists(ip))
    policy = AddressPolicy([str(net) for net in allowed])
    assert (policy.refusal(ip) is not None) == oracle_refuses(ip, allowed), (ip, allowed)


def test_the_strategies_draw_refused_and_allowed_addresses_alike() -> None:
    verdicts = []

    @settings(max_examples=400, database=None, derandomize=True)  # the same draws every run
    @given(ANY_ADDRESS)
    def draw(ip) -> None:
        verdicts.append(oracle_refuses(ip))

    draw()
    # A strategy that drew only public (or only refused) addresses would let a wrong policy pass.
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8


@given(st.ip_addresses(v=4))
def test_an_ipv4_mapped_address_is_judged_as_its_ipv4_address(ip) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert AddressPolicy().refusal(mapped) == AddressPolicy().refusal(ip)


# --- the socket factory -----------------------------------------------------------------------


def _addr_info(host: str, port: int = 80) -> tuple:
    """One getaddrinfo entry, as aiohttp hands it to the socket factory (numeric: no lookup)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_socket_factory_returns_a_socket_for_an_allowed_address(host: str) -> None:
    info = _addr_info(host)
    sock = AddressPolicy(["127.0.0.1/32", "::1/128"]).socket_factory(info)
    try:
        assert isinstance(sock, socket.socket)
        assert sock.family == info[0] and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()


def test_socket_factory_makes_the_socket_it_is_asked_for() -> None:
    # Family, type and protocol as given, not the defaults (a datagram socket, UDP named).
    info = (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", ("127.0.0.1", 53))
    sock = AddressPolicy(["127.0.0.1/32"]).socket_factory(info)
    try:
        assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    finally:
        sock.close()


def test_socket_factory_returns_an_unconnected_socket_for_a_public_address() -> None:
    sock = AddressPolicy().socket_factory(_addr_info("8.8.8.8"))
    try:
        assert isinstance(sock, socket.socket) and sock.family == socket.AF_INET
        with pytest.raises(OSError) as caught:
            sock.getpeername()  # made, never connected: the connector connects it
        assert caught.value.errno == errno.ENOTCONN
    finally:
        sock.close()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "fd00:ec2::254"]
)
def test_socket_factory_refuses_a_blocked_address_with_eacces(host: str) -> None:
    with pytest.raises(BlockedAddress) as caught:
        AddressPolicy().socket_factory(_addr_info(host))
    error = caught.value
    assert isinstance(error, OSError)
    assert error.errno == errno.EACCES
    assert error.address == host
    assert host in str(error) and "--allow-net" in str(error)


def test_socket_factory_refuses_what_is_not_allowed_even_with_an_allow_list() -> None:
    with pytest.raises(BlockedAddress):
        AddressPolicy(["127.0.0.1/32"]).socket_factory(_addr_info("127.0.0.2"))


# --- a refused address is never connected to ----------------------------------------------------


class _SocketSpy:
    """Stands in for the socket module inside crawler.fetch.addresses: records every socket made."""

    def __init__(self) -> None:
        self.made: list[tuple] = []

    def socket(self, **kwargs):  # noqa: ANN003 - socket.socket's keywords
        self.made.append(tuple(kwargs.items()))
        return socket.socket(**kwargs)


@pytest.mark.parametrize(
    "host", ["64:ff9b::7f00:1", "64:ff9b:1::7f00:1", "2002:7f00:1::1", _TEREDO_10_0_0_1, "::7f00:1", "fec0::1"]
)
async def test_a_refused_transition_address_gets_no_socket(hello_server, monkeypatch, host: str) -> None:
    from crawler.fetch.fetcher import Fetcher
    from crawler.settings import Settings

    spy = _SocketSpy()
    monkeypatch.setattr("crawler.fetch.addresses.socket", spy)
    # No --allow-net here: with 127.0.0.1/32 allowed, 64:ff9b::7f00:1 would be allowed too (it is
    # judged by the IPv4 address it carries) and a connection to it attempted.
    async with Fetcher(Settings(max_attempts=1)) as fetcher:
        refused = await fetcher.attempt("GET", f"http://[{host}]:{hello_server.port}/")
    assert spy.made == []  # refused before a socket existed: nothing was sent anywhere
    assert refused.error_kind == "blocked", refused.error
    async with Fetcher(Settings(allow_net=["127.0.0.1/32"], max_attempts=1)) as fetcher:
        allowed = await fetcher.attempt("GET", f"http://127.0.0.1:{hello_server.port}/")
    assert allowed.status == 200 and len(spy.made) == 1  # the spy sees the sockets that are made


# --- through aiohttp's connector, against a real server on loopback ----------------------------


@pytest.fixture
async def hello_server(aiohttp_server):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return await aiohttp_server(app)  # listens on 127.0.0.1


def _session(policy: AddressPolicy) -> aiohttp.ClientSession:
    # The crawler's own resolver, asking 127.0.0.1 only: no query leaves the machine, and
    # localhost is answered from /etc/hosts and c-ares' built-in localhost. (aiohttp's
    # AsyncResolver with lookups="f" failed every other new channel here: "Could not contact
    # DNS servers", so these cases passed or failed by the tests run before them.)
    resolver = CachingResolver(servers=["127.0.0.1"], timeout=1)
    connector = aiohttp.TCPConnector(resolver=resolver, socket_factory=policy.socket_factory)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_connection_to_loopback_is_blocked_and_classified_as_blocked(hello_server, host: str) -> None:
    async with _session(AddressPolicy()) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://{host}:{hello_server.port}/")
    kind, detail = classify(caught.value)
    assert kind == "blocked"
    assert "loopback" in detail and "--allow-net" in detail


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_connection_to_loopback_is_blocked_when_another_address_is_allowed(hello_server, host: str) -> None:
    async with _session(AddressPolicy(["127.0.0.2/32", "10.0.0.0/8"])) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://{host}:{hello_server.port}/")
    assert classify(caught.value)[0] == "blocked"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_connection_to_an_allowed_loopback_address_succeeds(hello_server, host: str) -> None:
    # For localhost, ::1 (if resolved) is still refused; the connector falls back to 127.0.0.1.
    async with _session(AddressPolicy(["127.0.0.1/32"])) as session:
        async with session.get(f"http://{host}:{hello_server.port}/") as response:
            assert response.status == 200
            assert await response.text() == "hello"
