"""HTTP/1.x: the Host header and absolute-form targets, ports dropped, IP literals no name;
real requests from curl (tests/data/tls/record.sh) split at every byte; garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.tlsgen import capture
from tproxyd.relay.sniff import MAX_SNIFF, NEED_MORE, NO_NAME, sniff_stream
from tproxyd.relay.sniff_http import HttpError, sniff_http

CAPTURES = {
    "curl-http11.http": "plain.example.com",
    "curl-http-proxy.http": "absolute.example.com",  # curl -x: GET http://absolute.example.com/x
    "curl-http-ipv6.http": NO_NAME,  # Host: [2001:db8::1]:8080
}


@pytest.mark.parametrize("name, expected", CAPTURES.items())
def test_real_requests_split_at_every_offset(name, expected):
    stream = capture(name)
    settled = False
    for cut in range(len(stream) + 1):
        got = sniff_http(stream[:cut])
        assert got == expected if settled else got in (NEED_MORE, expected), cut
        settled = got == expected
    assert sniff_stream(stream) == expected


@pytest.mark.parametrize("request_, expected", [
    (b"GET / HTTP/1.1\r\nHost: Example.COM\r\n\r\n", "example.com"),
    (b"GET / HTTP/1.1\r\nhost:example.com:8080\r\n\r\n", "example.com"),
    (b"GET / HTTP/1.1\nHOST:   example.com.  \n\n", "example.com"),  # bare LF, trailing dot
    (b"POST /x HTTP/1.0\r\nUser-Agent: a\r\nHost: api.example.com\r\n", "api.example.com"),
    (b"GET http://abs.example/p HTTP/1.1\r\nHost: other.example\r\n\r\n", "abs.example"),
    (b"GET HTTP://user:pw@abs.example:81/ HTTP/1.1\r\n", "abs.example"),
    (b"GET http://[2001:db8::1]:80/ HTTP/1.1\r\n", NO_NAME),
    (b"OPTIONS * HTTP/1.1\r\nHost: opt.example\r\n\r\n", "opt.example"),
    (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n", NO_NAME),  # an address
    (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", NO_NAME),
    (b"GET / HTTP/1.1\r\nHost: 198.51.100.7:80\r\n\r\n", NO_NAME),
    (b"GET / HTTP/1.1\r\nHost: a.example:x\r\n\r\n", NO_NAME),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", NO_NAME),
    (b"GET / HTTP/1.1\r\nHost: b\xc3\xbc.example\r\n\r\n", NO_NAME),
    (b"GET / HTTP/1.0\r\n\r\n", NO_NAME),  # no Host at all
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n", NEED_MORE),
    (b"GET / HTTP/1.1", NEED_MORE),
    (b"PROPFIND", NEED_MORE),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", NO_NAME),  # HTTP/2 with prior knowledge
    (b"GET /\r\n", NO_NAME),  # HTTP/0.9
    (b"SSH-2.0-OpenSSH_9.2\r\n", NO_NAME),
    (b"get / HTTP/1.1\r\n", NO_NAME),
    (b"\x00\x00\x00", NO_NAME),
    (b"EHLO mail.example\r\n", NO_NAME),
])
def test_requests(request_, expected):
    assert sniff_http(request_) == expected


@pytest.mark.parametrize("request_", [
    b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\nHost: a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
])
def test_malformed_headers_raise_http_error(request_):
    with pytest.raises(HttpError):
        sniff_http(request_)
    assert sniff_stream(request_) is NO_NAME


def test_bounded():
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * MAX_SNIFF + b"\r\n"
    assert sniff_http(head[:MAX_SNIFF - 1]) is NEED_MORE
    assert sniff_http(head[:MAX_SNIFF + 50]) is NO_NAME
    assert sniff_http(b"GET " + b"/" * MAX_SNIFF) is NO_NAME


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"GET http://", b"G"]))
def test_garbage_raises_only_http_error(tail, head):
    try:
        result = sniff_http(head + tail)
    except HttpError:
        return
    assert result in (NEED_MORE, NO_NAME) or isinstance(result, str)
