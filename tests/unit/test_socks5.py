"""SOCKS5 codec: exact bytes for each message, replies parsed at every split, and garbage
raising only Socks5Error."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.relay import socks5
from tproxyd.relay.socks5 import Socks5Error


def test_greeting_and_method_selection():
    assert socks5.greeting() == b"\x05\x01\x00"
    assert socks5.greeting(with_password=True) == b"\x05\x02\x00\x02"
    assert socks5.parse_method(b"") is None
    assert socks5.parse_method(b"\x05") is None
    assert socks5.parse_method(b"\x05\x00") == socks5.MethodChoice(socks5.NO_AUTH, 2)
    assert socks5.parse_method(b"\x05\x02", with_password=True).method == socks5.USERNAME_PASSWORD


@pytest.mark.parametrize("data, with_password, reason, words", [
    (b"\x05\xff", False, "auth_required", "wants a username"),
    (b"\x05\xff", True, "no_method", "none of our methods"),
    (b"\x05\x02", False, "protocol", "did not offer"),
    (b"\x05\x01", True, "protocol", "did not offer"),
    (b"\x04\x00", False, "protocol", "version byte 0x04"),
    (b"H", False, "protocol", "version byte 0x48"),
    (b"HTTP/1.1 400 Bad Request\r\n", False, "protocol", "an HTTP server?"),
])
def test_method_refusals(data, with_password, reason, words):
    with pytest.raises(Socks5Error) as info:
        socks5.parse_method(data, with_password)
    assert info.value.reason == reason and words in str(info.value)


def test_username_password():
    assert socks5.auth_request("alice", "pä55") == b"\x01\x05alice\x05p\xc3\xa455"
    with pytest.raises(ValueError):
        socks5.auth_request("a" * 256, "x")
    with pytest.raises(ValueError):
        socks5.auth_request("a", "")
    assert socks5.parse_auth(b"\x01") is None
    assert socks5.parse_auth(b"\x01\x00").size == 2
    assert socks5.parse_auth(b"\x05\x00").size == 2  # servers that answer with the SOCKS version
    with pytest.raises(Socks5Error) as info:
        socks5.parse_auth(b"\x01\x01")
    assert info.value.reason == "auth_failed"
    with pytest.raises(Socks5Error):
        socks5.parse_auth(b"\x00")


def test_requests_for_each_address_type():
    assert socks5.connect_request("198.18.2.2", 443) == b"\x05\x01\x00\x01\xc6\x12\x02\x02\x01\xbb"
    assert socks5.connect_request("2001:db8::2", 80) == (
        b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000002") + b"\x00\x50")
    assert socks5.connect_request("example.com", 443) == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert socks5.connect_request("bücher.example", 80)[4:5] == bytes((len("xn--bcher-kva.example"),))
    assert socks5.udp_associate_request() == b"\x05\x03\x00\x01\0\0\0\0\0\0"
    assert socks5.udp_associate_request("198.18.1.1", 5353)[1] == socks5.UDP_ASSOCIATE
    for bad in (("x" * 256, 80), ("198.18.0.1", 70000), ("", 80)):
        with pytest.raises(ValueError):
            socks5.connect_request(*bad)


REPLIES = [
    (b"\x05\x00\x00\x01\xc6\x12\x00\x01\x04\x38", socks5.Reply(0, "198.18.0.1", 1080, 10)),
    (b"\x05\x05\x00\x04" + bytes(15) + b"\x01\x00\x35", socks5.Reply(5, "::1", 53, 22)),
    (b"\x05\x04\x00\x03\x04host\x00\x50", socks5.Reply(4, "host", 80, 11)),
]


@pytest.mark.parametrize("wire, expected", REPLIES)
def test_reply_parsed_at_every_split_and_tunnel_bytes_kept(wire, expected):
    for cut in range(len(wire)):
        assert socks5.parse_reply(wire[:cut]) is None
    data = wire + b"tunnel bytes"
    reply = socks5.parse_reply(data)
    assert reply == expected
    assert data[reply.size:] == b"tunnel bytes"


def test_reply_names_and_blame():
    names = {code: socks5.parse_reply(bytes((5, code, 0, 1)) + bytes(6)) for code in range(10)}
    assert names[0].ok and names[0].name == "succeeded" and names[0].unspecified
    assert names[1].name == "general failure" and not names[1].about_destination
    assert names[2].name == "connection not allowed by ruleset"
    assert [c for c, r in names.items() if r.about_destination] == [3, 4, 5, 6]
    assert names[6].name == "TTL expired"
    assert names[7].name == "command not supported"
    assert names[8].name == "address type not supported"
    assert names[9].name == "unknown reply 0x09"


@pytest.mark.parametrize("data, words", [
    (b"\x04\x00\x00\x01", "version byte 0x04"),
    (b"\x05\x00\x00\x09", "unknown address type 0x09"),
])
def test_reply_garbage(data, words):
    with pytest.raises(Socks5Error, match=words):
        socks5.parse_reply(data)


def test_udp_header_round_trip():
    for host, port in (("198.18.2.2", 53), ("2001:db8::53", 53), ("dns.example", 853)):
        wire = socks5.udp_header(host, port) + b"payload"
        parsed = socks5.parse_udp(wire)
        assert (parsed.host, parsed.port, wire[parsed.offset:]) == (host, port, b"payload")
    assert socks5.udp_header("198.18.2.2", 53) == b"\0\0\0\x01\xc6\x12\x02\x02\x00\x35"


@pytest.mark.parametrize("data, reason", [
    (b"\0\0\x01\x01" + bytes(6), "fragment"),
    (b"\0\0\0", "protocol"),
    (b"\0\0\0\x01\xc6\x12", "protocol"),
    (b"\0\0\0\x03\x05ab", "protocol"),
    (b"\0\0\0\x07" + bytes(6), "protocol"),
])
def test_udp_refusals(data, reason):
    with pytest.raises(Socks5Error) as info:
        socks5.parse_udp(data)
    assert info.value.reason == reason


@settings(max_examples=2000)
@given(st.binary(max_size=300), st.booleans())
def test_parsers_raise_only_their_own_error(data, with_password):
    for parse in (lambda d: socks5.parse_method(d, with_password), socks5.parse_auth,
                  socks5.parse_reply, socks5.parse_udp):
        with contextlib.suppress(Socks5Error):
            result = parse(data)
            if result is not None and hasattr(result, "size"):
                assert 0 < result.size <= len(data)


@given(st.integers(0, 255), st.sampled_from([1, 3, 4]), st.binary(min_size=0, max_size=20),
       st.integers(0, 65535), st.binary(max_size=10))
def test_well_formed_replies_of_any_code_and_address_parse(code, atyp, addr, port, tail):
    addr = bytes((len(addr),)) + addr if atyp == 3 else addr.ljust(16 if atyp == 4 else 4, b"\0")[:16]
    if atyp == 1:
        addr = addr[:4]
    wire = bytes((5, code, 0, atyp)) + addr + struct.pack("!H", port)
    reply = socks5.parse_reply(wire + tail)
    assert reply is not None and reply.code == code and reply.port == port and reply.size == len(wire)
