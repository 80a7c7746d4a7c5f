"""The address policy: which IPs a request may connect to, checked on the resolved address of
every connection (so every redirect hop, every DNS answer, no gap between check and connect).

Loopback, private, link-local, cloud-metadata and other special ranges are refused unless a
network is allowed with --allow-net. Pure logic plus one socket factory for aiohttp's connector.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Iterable

from crawler.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Named so that a refusal says which kind of range it hit.
# The first match names the refusal, so the narrow metadata addresses come before their ranges.
REFUSED_RANGES: tuple[tuple[str, str], ...] = (
    ("100.100.100.200/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
_REFUSED = tuple((ipaddress.ip_network(net), label) for net, label in REFUSED_RANGES)


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


class AddressPolicy:
    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed = parse_networks(allow)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why the address is refused (the range's label), or None if it may be fetched."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
        if any(ip in net for net in self.allowed if net.version == ip.version):
            return None
        for net, label in _REFUSED:
            if net.version == ip.version and ip in net:
                return label
        return None

    def socket_factory(self, addr_info: tuple) -> socket.socket:
        """aiohttp's connector calls this for each address it is about to connect to."""
        family, type_, proto, _, sockaddr = addr_info
        label = self.refusal(sockaddr[0])
        if label is not None:
            raise BlockedAddress(sockaddr[0], label)
        return socket.socket(family=family, type=type_, proto=proto)
