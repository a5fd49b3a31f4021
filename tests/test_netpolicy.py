"""The outbound address table, as a pure function of addresses and spellings."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptdaemon.netpolicy import (
    BLOCKED_V4,
    BLOCKED_V6,
    AddressPolicy,
    embedded_v4,
    literal_address,
)

POLICY = AddressPolicy()

REFUSED = [
    "0.0.0.0",  # noqa: S104 - an address to refuse, not to bind
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.255",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.170",
    "192.0.2.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.1.2.3",
    "::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::7f00:1",
    "64:ff9b:1::1",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::",
    "2001::1",
    "2001:db8::1",
    "fc00::1",
    "fd00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "ff05::1:3",
    "100::1",
]

ALLOWED = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("text", REFUSED)
def test_refused_addresses(text: str):
    assert POLICY.refusal(text) is not None


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed_addresses(text: str):
    assert POLICY.refusal(text) is None


def test_the_rule_is_named():
    assert POLICY.refusal("127.0.0.1") == "loopback (127.0.0.0/8)"
    assert POLICY.refusal("169.254.169.254") == "link-local (169.254.0.0/16)"
    rule = POLICY.refusal("64:ff9b::a9fe:a9fe")
    assert rule == "link-local (169.254.0.0/16) (IPv4 inside IPv6)"


def test_allow_networks_let_through_only_what_they_name():
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.0/8")])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None
    assert policy.refusal("::1") is not None
    assert policy.refusal("10.0.0.1") is not None


v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def _v6(value: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(value)


@given(v4)
def test_ipv4_inside_ipv6_gets_the_ipv4_verdict(address: ipaddress.IPv4Address):
    refused = POLICY.refusal(address) is not None
    mapped = _v6(0xFFFF << 32 | int(address))
    nat64 = _v6(0x64FF9B << 96 | int(address))
    six_to_four = _v6(0x2002 << 112 | int(address) << 80 | 1)
    for wrapped in (mapped, nat64, six_to_four):
        assert embedded_v4(wrapped) == address
        assert (POLICY.refusal(wrapped) is not None) == refused


@given(v4)
def test_ipv4_table_covers_what_the_standard_library_calls_special(
    address: ipaddress.IPv4Address,
):
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )
    # The table may refuse more (all of 192.0.0.0/24), never less.
    if special:
        assert POLICY.refusal(address) is not None


@given(v6)
def test_ipv6_allowed_only_where_the_standard_library_says_global(
    address: ipaddress.IPv6Address,
):
    if embedded_v4(address) is not None:
        return
    if POLICY.refusal(address) is None:
        assert address.is_global
        assert not address.is_multicast


@given(st.sampled_from([a for a, _ in BLOCKED_V6]), st.integers(0, 2**128 - 1))
def test_every_ipv6_prefix_refuses_its_whole_range(
    network: ipaddress.IPv6Network, noise: int
):
    host_bits = 128 - network.prefixlen
    address = _v6(int(network.network_address) | (noise & ((1 << host_bits) - 1)))
    assert POLICY.refusal(address) is not None


@given(st.sampled_from([a for a, _ in BLOCKED_V4]), st.integers(0, 2**32 - 1))
def test_every_ipv4_prefix_refuses_its_whole_range(
    network: ipaddress.IPv4Network, noise: int
):
    host_bits = 32 - network.prefixlen
    value = int(network.network_address) | (noise & ((1 << host_bits) - 1))
    address = ipaddress.IPv4Address(value)
    assert POLICY.refusal(address) is not None
    assert POLICY.refusal(_v6(0xFFFF << 32 | value)) is not None


@given(v4)
def test_every_spelling_of_an_ipv4_address_is_read_as_that_address(
    address: ipaddress.IPv4Address,
):
    value = int(address)
    a, b, c, d = address.packed
    spellings = [
        str(address),
        str(value),
        hex(value),
        f"0{value:o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{a:#x}.{b:#x}.{c:#x}.{d:#x}",
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
        f"[::ffff:{address}]",
    ]
    for spelling in spellings:
        read = literal_address(spelling)
        if isinstance(read, ipaddress.IPv6Address):
            read = embedded_v4(read)
        assert read == address, spelling


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST.",
        "api.localhost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "::1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0:0:0:0:0:ffff:7f00:1",
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "[fd00::1]",
        "0",
    ],
)
def test_saving_refuses_loopback_and_literal_addresses(host: str):
    assert POLICY.check_url_host(host) is not None


@pytest.mark.parametrize(
    "host", ["example.com", "8.8.8.8", "10.example", "0x.example", "123.example"]
)
def test_saving_resolves_no_name(host: str):
    assert POLICY.check_url_host(host) is None


def test_allowed_localhost_is_accepted_at_save_time():
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.0/8")])
    assert policy.check_url_host("localhost") is None
