"""Parsing the sockaddr that SO_ORIGINAL_DST returns: synthetic bytes, and arbitrary bytes raise
only SockaddrError."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxyd.relay.sockopts import SockaddrError, parse_sockaddr


def sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


def sockaddr_in6(host: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0))


def test_ipv4_and_ipv6():
    assert parse_sockaddr(sockaddr_in("198.18.2.2", 8080)) == ("198.18.2.2", 8080)
    assert parse_sockaddr(sockaddr_in6("2001:db8:2::2", 443)) == ("2001:db8:2::2", 443)


@pytest.mark.parametrize("raw", [b"", b"\x02", sockaddr_in("198.18.0.1", 1)[:10],
                                 sockaddr_in6("2001:db8::1", 1)[:20], b"\x07\x00" + bytes(14)])
def test_short_or_foreign_bytes_are_refused(raw):
    with pytest.raises(SockaddrError):
        parse_sockaddr(raw)


@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_sockaddr_error(raw):
    try:
        host, port = parse_sockaddr(raw)
    except SockaddrError:
        return
    assert 0 <= port <= 65535 and isinstance(host, str)


def test_udp_ancillary_data():
    from tproxyd.relay.sockopts import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR, SO_RXQ_OVFL, parse_udp_ancillary

    anc = [(socket.SOL_IP, IP_ORIGDSTADDR, sockaddr_in("198.18.2.2", 53)),
           (socket.SOL_SOCKET, SO_RXQ_OVFL, struct.pack("=I", 7))]
    assert parse_udp_ancillary(anc) == (("198.18.2.2", 53), 7)
    anc6 = [(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, sockaddr_in6("2001:db8:2::2", 443))]
    assert parse_udp_ancillary(anc6) == (("2001:db8:2::2", 443), None)
    assert parse_udp_ancillary([]) == (None, None)
    with pytest.raises(SockaddrError):
        parse_udp_ancillary([(socket.SOL_IP, IP_ORIGDSTADDR, b"\x02\x00")])


@given(st.lists(st.tuples(st.sampled_from([socket.SOL_IP, socket.IPPROTO_IPV6, socket.SOL_SOCKET]),
                          st.sampled_from([20, 74, 40, 1]), st.binary(max_size=32)), max_size=3))
def test_arbitrary_ancillary_data_raises_only_sockaddr_error(anc):
    from tproxyd.relay.sockopts import parse_udp_ancillary

    with contextlib.suppress(SockaddrError):
        parse_udp_ancillary(anc)


def test_udp_destinations_parse_the_same_from_the_cache_and_it_stays_bounded():
    from tproxyd.relay import sockopts

    def anc(i: int) -> list:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", 53, i.to_bytes(4, "big"))
        return [(socket.SOL_IP, sockopts.IP_ORIGDSTADDR, raw + bytes(8))]

    for _ in range(2):  # the second round answers from the cache, or after a clear
        for i in range(sockopts.DST_CACHE_SIZE + 10):
            assert sockopts.parse_udp_ancillary(anc(i))[0] == (socket.inet_ntoa(i.to_bytes(4, "big")), 53)
    assert len(sockopts._DST_CACHE) <= sockopts.DST_CACHE_SIZE
