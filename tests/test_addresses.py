"""The address policy: which resolved addresses a request may connect to, checked in the socket
factory aiohttp's connector calls for every connection. Public addresses appear here only as values;
nothing but 127.0.0.1 / ::1 is ever contacted."""

from __future__ import annotations

import errno
import ipaddress
import socket

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from crawler.addresses import REFUSED_RANGES, AddressPolicy, BlockedAddress, parse_networks
from crawler.errors import UsageError
from crawler.failures import classify

REFUSED_NETWORKS = [(ipaddress.ip_network(net), label) for net, label in REFUSED_RANGES]

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


def test_refusal_accepts_ip_address_objects() -> None:
    policy = AddressPolicy()
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert policy.refusal(ipaddress.ip_address("8.8.8.8")) is None


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


# --- properties -------------------------------------------------------------------------------


@st.composite
def refused_addresses(draw):
    """An address inside one of the refused ranges."""
    network, _ = draw(st.sampled_from(REFUSED_NETWORKS))
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network.network_address + offset


@given(refused_addresses())
def test_every_address_in_a_refused_range_is_refused_by_default(ip) -> None:
    assert AddressPolicy().refusal(ip) is not None
    assert AddressPolicy().refusal(str(ip)) is not None


@given(refused_addresses(), st.data())
def test_an_address_in_a_refused_range_is_allowed_by_any_allowed_network_containing_it(ip, data) -> None:
    prefix = data.draw(st.integers(0, ip.max_prefixlen))
    allowed = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    assert AddressPolicy([str(allowed)]).refusal(ip) is None


@given(refused_addresses(), st.data())
def test_an_address_in_a_refused_range_stays_refused_when_other_networks_are_allowed(ip, data) -> None:
    prefix = data.draw(st.integers(1, ip.max_prefixlen))
    containing = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    # The sibling of the containing network: the same size, disjoint from it.
    sibling_start = type(ip)(int(containing.network_address) ^ (1 << (ip.max_prefixlen - prefix)))
    sibling = ipaddress.ip_network(f"{sibling_start}/{prefix}")
    assert ip not in sibling
    assert AddressPolicy([str(sibling)]).refusal(ip) is not None


@given(st.ip_addresses(v=4))
def test_an_ipv4_mapped_address_is_judged_as_its_ipv4_address(ip) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert AddressPolicy().refusal(mapped) == AddressPolicy().refusal(ip)


@given(st.ip_addresses())
def test_refusal_is_the_label_of_a_range_containing_the_address_or_none(ip) -> None:
    label = AddressPolicy().refusal(ip)
    judged = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip
    containing = {lab for net, lab in REFUSED_NETWORKS if net.version == judged.version and judged in net}
    if containing:
        assert label in containing
    else:
        assert label is None


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


def test_socket_factory_returns_a_socket_for_a_public_address_without_connecting() -> None:
    sock = AddressPolicy().socket_factory(_addr_info("8.8.8.8"))
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


# --- through aiohttp's connector, against a real server on loopback ----------------------------


@pytest.fixture
async def hello_server(aiohttp_server):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return await aiohttp_server(app)  # listens on 127.0.0.1


def _session(policy: AddressPolicy) -> aiohttp.ClientSession:
    # The resolver reads /etc/hosts (and c-ares' built-in localhost) only: no query leaves the machine.
    resolver = aiohttp.AsyncResolver(nameservers=["127.0.0.1"], lookups="f", timeout=1, tries=1)
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
