"""HTTP CONNECT codec: the request's exact bytes, responses parsed at every split with the
tunnel's first bytes kept, the 16 KiB bound, and garbage raising only HttpConnectError."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.relay import httpconnect
from tproxyd.relay.httpconnect import HttpConnectError


def test_request_without_and_with_auth():
    assert httpconnect.connect_request("203.0.113.5", 443) == (
        b"CONNECT 203.0.113.5:443 HTTP/1.1\r\nHost: 203.0.113.5:443\r\n\r\n")
    wire = httpconnect.connect_request("2001:db8::5", 443, "alice", "p:ä")
    lines = wire.split(b"\r\n")
    assert lines[0] == b"CONNECT [2001:db8::5]:443 HTTP/1.1"
    assert lines[1] == b"Host: [2001:db8::5]:443"
    assert lines[2] == b"Proxy-Authorization: Basic " + base64.b64encode("alice:p:ä".encode())
    assert wire.endswith(b"\r\n\r\n")
    assert httpconnect.connect_request("github.com", 443).startswith(b"CONNECT github.com:443 ")


@pytest.mark.parametrize("host, port", [("evil\r\nX-Injected: 1", 443), ("a b", 80), ("", 80),
                                        ("198.18.0.1", 0), ("user@host", 80)])
def test_request_refuses_targets_that_would_break_the_request(host, port):
    with pytest.raises(ValueError):
        httpconnect.connect_request(host, port)


RESPONSES = [
    (b"HTTP/1.1 200 Connection established\r\n\r\n", 200, "HTTP/1.1 200 Connection established"),
    (b"HTTP/1.0 200 OK\r\nProxy-Agent: tinyproxy/1.11.1\r\n\r\n", 200, "HTTP/1.0 200 OK"),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n"
     b"Content-Length: 0\r\n\r\n", 407, "HTTP/1.1 407 Proxy Authentication Required"),
    (b"HTTP/1.1 502\r\n\r\n", 502, "HTTP/1.1 502"),
    (b"HTTP/1.1 200 OK\n\n", 200, "HTTP/1.1 200 OK"),  # bare LF line ends
]


@pytest.mark.parametrize("wire, code, line", RESPONSES)
def test_response_at_every_split_keeps_the_tunnel_bytes(wire, code, line):
    for cut in range(len(wire)):
        assert httpconnect.parse_response(wire[:cut]) is None
    data = wire + b"\x16\x03\x01 server hello"
    response = httpconnect.parse_response(data)
    assert (response.code, response.status_line) == (code, line)
    assert data[response.size:] == b"\x16\x03\x01 server hello"


def test_response_meaning():
    ok = httpconnect.parse_response(RESPONSES[1][0])
    assert ok.ok and not ok.auth_failed and ok.headers == (("Proxy-Agent", "tinyproxy/1.11.1"),)
    denied = httpconnect.parse_response(RESPONSES[2][0])
    assert denied.auth_failed and not denied.ok and not denied.about_destination
    assert httpconnect.parse_response(RESPONSES[3][0]).about_destination


def test_header_bound():
    big = b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * (16 * 1024) + b"\r\n\r\n"
    with pytest.raises(HttpConnectError) as info:
        httpconnect.parse_response(big)
    assert info.value.reason == "header_too_large"
    with pytest.raises(HttpConnectError):  # refused before the end arrives, not after
        httpconnect.parse_response(big[:16 * 1024 + 5])
    fits = b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100 + b"\r\n\r\n"
    assert httpconnect.parse_response(fits, limit=len(fits)).size == len(fits)


@pytest.mark.parametrize("data, words", [
    (b"\x05\x00", "a SOCKS5 server?"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP response"),
    (b"HTTP/2 200\r\n\r\n", "not an HTTP response"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "bad header line"),
    (b"\r\n\r\n", "not an HTTP response"),
])
def test_garbage(data, words):
    with pytest.raises(HttpConnectError, match=words) as info:
        httpconnect.parse_response(data)
    assert info.value.reason == "protocol"


@settings(max_examples=2000)
@given(st.one_of(st.binary(max_size=400),
                 st.builds(lambda a, b: b"HTTP/1.1 " + a + b"\r\n" + b, st.binary(max_size=40),
                           st.binary(max_size=200)),
                 st.lists(st.sampled_from([b"HTTP/1.1 ", b"200", b" OK", b"\r\n", b"\n", b"\r",
                                           b"X: y", b":", b" ", b"\x00", b"\xff"]),
                          max_size=30).map(b"".join)),
       st.integers(1, 500))
def test_parser_raises_only_its_own_error(data, limit):
    with contextlib.suppress(HttpConnectError):
        response = httpconnect.parse_response(data, limit=limit)
        if response is not None:
            assert 0 < response.size <= min(len(data), limit)
            assert 100 <= response.code <= 999
