"""The address policy: which IPs a request may connect to, checked on the resolved address of
every connection (so every redirect hop, every DNS answer, no gap between check and connect).

Every address that is not globally reachable is refused unless a network is allowed with
--allow-net: the entries of IANA's IPv4 and IPv6 Special-Purpose Address Registries that are not
globally reachable, multicast, the deprecated IPv6 site-local range and cloud metadata. An IPv6
address that carries an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) is judged
by that IPv4 address too, for refusing and for --allow-net. Pure logic plus one socket factory
for aiohttp's connector, which refuses before any socket exists.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable

from crawler.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The first range that holds an address decides: a label refuses it, None lets it through (the
# globally reachable exceptions inside a refused block come before the block). The narrow
# metadata addresses come before their ranges so that a refusal names them. From IANA's
# special-purpose registries as they stood in 2025; their "globally reachable: N/A" entries (6to4,
# Teredo, the 6to4 relay anycast) are refused: a transition relay reaches an address nobody chose.
REFUSED_RANGES: tuple[tuple[str, str | None], ...] = (
    ("100.100.100.200/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.9/32", None),  # Port Control Protocol anycast: globally reachable
    ("192.0.0.10/32", None),  # Traversal Using Relays around NAT anycast: globally reachable
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", None),  # AS112-v4
    ("192.52.193.0/24", None),  # AMT
    ("192.88.99.2/32", None),  # 6a44 relay anycast
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", None),  # direct delegation AS112 service
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # and 255.255.255.255, limited broadcast
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "NAT64 local-use"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix"),
    ("2001::/32", "Teredo"),
    ("2001:1::1/128", None),  # Port Control Protocol anycast
    ("2001:1::2/128", None),  # TURN anycast
    ("2001:1::3/128", None),  # DNS-SD service registration protocol anycast
    ("2001:3::/32", None),  # AMT
    ("2001:4:112::/48", None),  # AS112-v6
    ("2001:20::/28", None),  # ORCHIDv2
    ("2001:30::/28", None),  # drone remote ID protocol entity tags
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6) SIDs"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)


def _table(version: int) -> tuple[tuple[int, int, str | None], ...]:
    """The ranges of one IP version as (network, mask, label) integers: a lookup is a few integer
    operations per range, not an ipaddress containment test."""
    rows = []
    for cidr, label in REFUSED_RANGES:
        net = ipaddress.ip_network(cidr)
        if net.version == version:
            rows.append((int(net.network_address), int(net.netmask), label))
    return tuple(rows)


_RANGES = {4: _table(4), 6: _table(6)}

# The IPv6 forms that carry an IPv4 address, by prefix: (prefix, prefix length, name).
_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96
_NAT64 = int(ipaddress.IPv6Address("64:ff9b::"))  # /96, RFC 6052
_NAT64_LOCAL = int(ipaddress.IPv6Address("64:ff9b:1::"))  # /48, RFC 8215
_SIX_TO_FOUR = 0x2002  # 2002::/16, the IPv4 address in bits 16-47 (RFC 3056)
_TEREDO = 0x20010000  # 2001::/32, the client's IPv4 address inverted in the last 32 bits (RFC 4380)
_LOW32 = 0xFFFFFFFF


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, with the form's name, or None.

    A NAT64 local-use address (64:ff9b:1::/48) is read with the /96 layout (the IPv4 address in
    the last 32 bits), the layout of the well-known prefix; a network may use another, and the
    range is refused either way unless allowed.
    """
    n = int(ip)
    if n >> 32 == _MAPPED >> 32:
        return "IPv4-mapped", ipaddress.IPv4Address(n & _LOW32)
    if n >> 32 == 0:
        return ("IPv4-compatible", ipaddress.IPv4Address(n)) if n > 1 else None  # :: and ::1 are not
    if n >> 32 == _NAT64 >> 32:
        return "NAT64", ipaddress.IPv4Address(n & _LOW32)
    if n >> 80 == _NAT64_LOCAL >> 80:
        return "NAT64 local-use", ipaddress.IPv4Address(n & _LOW32)
    if n >> 112 == _SIX_TO_FOUR:
        return "6to4", ipaddress.IPv4Address((n >> 80) & _LOW32)
    if n >> 96 == _TEREDO:
        return "Teredo", ipaddress.IPv4Address(~n & _LOW32)
    return None


class BlockedAddress(OSError):
    """Raised at connect time for an address the policy refuses. An OSError, so aiohttp reports
    it as a connection failure that classification recognises as `blocked`."""

    def __init__(self, address: str, label: str) -> None:
        super().__init__(errno.EACCES, f"address {address} is {label} and not allowed (see --allow-net)")
        self.address = address


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise UsageError(f"--allow-net '{cidr}' is not a network; write it as CIDR, e.g. 127.0.0.1/32.") from None
    return tuple(networks)


def _label(ip: IPAddress) -> str | None:
    n = int(ip)
    for network, mask, label in _RANGES[ip.version]:
        if n & mask == network:
            return label
    return None


class AddressPolicy:
    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed = parse_networks(allow)

    def _is_allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.allowed if net.version == ip.version)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why the address is refused (the range's label), or None if it may be fetched."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        carried = embedded_ipv4(ip) if ip.version == 6 else None
        if carried is not None and carried[0] == "IPv4-mapped":
            ip, carried = carried[1], None  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
        if self.allowed and (self._is_allowed(ip) or (carried is not None and self._is_allowed(carried[1]))):
            return None
        if carried is not None:
            form, ipv4 = carried
            label = _label(ipv4)
            if label is not None:
                return f"{label} ({form} of {ipv4})"
        return _label(ip)

    def socket_factory(self, addr_info: tuple) -> socket.socket:
        """aiohttp's connector calls this for each address it is about to connect to: a refused
        address raises before a socket is made, so no packet is ever sent to it."""
        family, type_, proto, _, sockaddr = addr_info
        label = self.refusal(sockaddr[0])
        if label is not None:
            raise BlockedAddress(sockaddr[0], label)
        return socket.socket(family=family, type=type_, proto=proto)
