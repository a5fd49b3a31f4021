"""Which addresses user destinations may reach.

Templates name hosts that the daemon then connects to on its users'
behalf, so a template must not be a way into the host itself, the local
network or a cloud's metadata service. The rule is checked on the address
that is actually connected to: by the resolver, on every answer it
gives, and again by the connector's socket factory, so a DNS answer that
changes between a check and the connect gets nothing through.

The table is explicit rather than `ipaddress`'s `is_global`, which lets
some multicast and special-purpose ranges through and knows nothing of
IPv4 addresses carried inside IPv6 ones.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _table(rows: Iterable[tuple[str, str]]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(prefix), name) for prefix, name in rows)


BLOCKED_V4: Final = _table(
    [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "special-purpose"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    ]
)

BLOCKED_V6: Final = _table(
    [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        # IPv4-compatible addresses are deprecated and never routed.
        ("::/96", "reserved"),
        ("64:ff9b:1::/48", "private"),
        ("100::/64", "reserved"),
        # Teredo, ORCHID, benchmarking and the other protocol assignments.
        ("2001::/23", "special-purpose"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ]
)

# IPv6 forms that carry an IPv4 address: the IPv4 rule applies to it.
MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
SIX_TO_FOUR: Final = ipaddress.IPv6Network("2002::/16")

# What inet_aton takes as an IPv4 address: 1 to 4 parts, each decimal, octal
# or hex ("2130706433", "0x7f.1", "0177.0.0.1").
_INET_ATON: Final = re.compile(
    r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}\.?"
)


def embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a mapped, NAT64 or 6to4 IPv6 address."""
    if address in MAPPED or address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def blocked_rule(address: IPAddress) -> str | None:
    """The rule that refuses an address by the built-in table, or None."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "link-local"
        inner = embedded_v4(address)
        if inner is not None:
            rule = blocked_rule(inner)
            return f"{rule} (IPv4 inside IPv6)" if rule else None
        table = BLOCKED_V6
    else:
        table = BLOCKED_V4
    for network, name in table:
        if address in network:
            return f"{name} ({network})"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host spells, in any spelling a resolver accepts."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0] if "%" in text else text)
    except ValueError:
        pass
    if _INET_ATON.fullmatch(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text.rstrip(".")))
        except OSError:
            return None
    return None


def is_localhost(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class AddressRefused(OSError):  # noqa: N818 - a refusal, raised like an OSError
    """A destination address that the outbound policy does not let through."""

    def __init__(self, host: str, address: str, rule: str) -> None:
        super().__init__(f"{host} leads to {address}, refused: {rule}")
        self.host = host
        self.address = address
        self.rule = rule


class AddressPolicy:
    """The built-in table, less the networks the operator allows."""

    def __init__(self, allow_networks: Sequence[IPNetwork] = ()) -> None:
        self.allow_networks = tuple(allow_networks)

    def refusal(self, address: IPAddress | str) -> str | None:
        """Why an address may not be reached, or None when it may."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address in MAPPED:
            # A mapped address is the IPv4 host itself.
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        for network in self.allow_networks:
            if address.version == network.version and address in network:
                return None
        return blocked_rule(address)

    def check(self, host: str, address: str) -> None:
        rule = self.refusal(address)
        if rule is not None:
            raise AddressRefused(host, address, rule)

    def check_url_host(self, host: str) -> str | None:
        """Why a URL's host is refused when a template is saved, or None.

        Names are not resolved here: only `localhost` and literal addresses
        are judged; names are judged when they are connected to.
        """
        if is_localhost(host):
            if self.refusal("127.0.0.1") is None:
                return None
            return "localhost is loopback"
        address = literal_address(host)
        if address is None:
            return None
        return self.refusal(address)


__all__ = [
    "BLOCKED_V4",
    "BLOCKED_V6",
    "AddressPolicy",
    "AddressRefused",
    "blocked_rule",
    "embedded_v4",
    "literal_address",
]
