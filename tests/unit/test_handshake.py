"""The upstream handshake without I/O: conversations with a SOCKS5 and an HTTP proxy as the
relay will have them (replies split at every byte), each failure's outcome and reason, and
arbitrary replies ending only in a Step or a HandshakeError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.relay import socks5
from tproxyd.relay.handshake import (
    AUTH,
    DONE,
    GREETING,
    REQUEST,
    Handshake,
    HandshakeError,
    udp_relay_address,
)
from tproxyd.state.health import DECLINED, FAILED
from tproxyd.state.upstreams import Secret, Upstream

SOCKS = Upstream(name="corp", type="socks5", host="198.51.100.7", port=1080)
SOCKS_AUTH = Upstream(name="corp", type="socks5", host="198.51.100.7", port=1080, username="alice",
                      password=Secret("s3cret", "/etc/tproxyd/corp.password"))
HTTPUP = Upstream(name="web", type="http", host="proxy.example.net", port=3128, username="alice",
                  password=Secret("s3cret", "/p"), check_target="[2001:db8::5]:443")
OK_REPLY = b"\x05\x00\x00\x01\xc6\x12\x00\x01\x04\x38"


def feed_bytewise(hs, data):
    """Feed one byte at a time, as the slowest network would; return the last Step and all sent."""
    sent, step = b"", None
    for i in range(len(data)):
        step = hs.feed(data[i:i + 1])
        sent += step.send
        if step.done:
            return step, sent, data[i + 1:]
    return step, sent, b""


def test_socks5_with_password_one_byte_at_a_time():
    hs = Handshake(SOCKS_AUTH, "198.18.2.2", 443)
    assert hs.start() == b"\x05\x02\x00\x02" and hs.state == GREETING
    step, sent, _ = feed_bytewise(hs, b"\x05\x02")
    assert sent == b"\x01\x05alice\x06s3cret" and hs.state == AUTH
    step, sent, _ = feed_bytewise(hs, b"\x01\x00")
    assert sent == socks5.connect_request("198.18.2.2", 443) and hs.state == REQUEST
    step, sent, later = feed_bytewise(hs, OK_REPLY + b"HTTP/1.1 200 OK")
    assert step.done and hs.state == DONE and step.bound == ("198.18.0.1", 1080)
    assert step.rest + later == b"HTTP/1.1 200 OK"


def test_socks5_reply_and_tunnel_bytes_in_one_segment():
    hs = Handshake(SOCKS, "2001:db8::2", 80)
    assert hs.start() == b"\x05\x01\x00"
    assert hs.feed(b"\x05\x00").send == socks5.connect_request("2001:db8::2", 80)
    step = hs.feed(OK_REPLY + b"first bytes")
    assert step.done and step.rest == b"first bytes"
    with pytest.raises(RuntimeError):
        hs.feed(b"more")


@pytest.mark.parametrize("upstream, replies, outcome, reason, words", [
    (SOCKS_AUTH, [b"\x05\x02", b"\x01\x01"], FAILED, "auth_failed", "refused the username"),
    (SOCKS, [b"\x05\xff"], FAILED, "auth_required", "wants a username"),
    (SOCKS, [b"HTTP/1.1 400 Bad Request\r\n"], FAILED, "protocol", "an HTTP server?"),
    (SOCKS, [b"\x05\x00", b"\x05\x05\x00\x01" + bytes(6)], DECLINED, "connection refused",
     "socks5 reply: connection refused"),
    (SOCKS, [b"\x05\x00", b"\x05\x02\x00\x01" + bytes(6)], DECLINED,
     "connection not allowed by ruleset", "not allowed"),
    (SOCKS, [b"\x05\x00\x05\x00\x00"], FAILED, "protocol", "before the request"),
    (HTTPUP, [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"], FAILED, "auth_failed",
     "authentication failed: HTTP/1.1 407"),
    (HTTPUP, [b"HTTP/1.1 403 Forbidden\r\n\r\n"], DECLINED, "status 403", "HTTP/1.1 403 Forbidden"),
    (HTTPUP, [b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000], FAILED, "header_too_large", "16384"),
    (HTTPUP, [b"\x05\x00"], FAILED, "protocol", "a SOCKS5 server?"),
])
def test_failures_carry_outcome_and_reason(upstream, replies, outcome, reason, words):
    hs = Handshake(upstream, "198.18.2.2", 443)
    hs.start()
    with pytest.raises(HandshakeError) as info:
        for reply in replies:
            hs.feed(reply)
    assert (info.value.outcome, info.value.reason) == (outcome, reason)
    assert words in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("upstream, replies", [
    (SOCKS, [b"\x05\x00", b"\x05\x04\x00\x01" + bytes(6)]),
    (HTTPUP, [b"HTTP/1.1 502 Bad Gateway\r\n\r\n"]),
])
def test_a_refused_request_for_a_name_says_the_name(upstream, replies):
    """Issue 13: an upstream asked for a sniffed name; its refusal is reported with the name."""
    for host, named in (("www.example.com", True), ("198.18.2.2", False)):
        hs = Handshake(upstream, host, 443)
        hs.start()
        with pytest.raises(HandshakeError) as info:
            for reply in replies:
                hs.feed(reply)
        assert info.value.outcome == DECLINED
        assert ("(CONNECT www.example.com:443)" in str(info.value)) is named


def test_socks5_reply_with_the_longest_name():
    hs = Handshake(SOCKS, "198.18.2.2", 443)
    hs.start()
    hs.feed(b"\x05\x00")
    assert not hs.feed(b"\x05\x00\x00\x03\xff" + b"n" * 254).done
    step = hs.feed(b"n\x00\x50tunnel")
    assert step.done and step.bound == ("n" * 255, 80) and step.rest == b"tunnel"


def test_closed_mid_handshake():
    hs = Handshake(SOCKS_AUTH, "198.18.2.2", 443)
    hs.start()
    hs.feed(b"\x05\x02")
    err = hs.closed()
    assert (err.outcome, err.reason) == (FAILED, "closed") and "auth step" in str(err)


def test_http_connect_with_auth_and_tunnel_bytes():
    hs = Handshake(HTTPUP, "github.com", 443)
    wire = hs.start()
    assert wire.startswith(b"CONNECT github.com:443 HTTP/1.1\r\nHost: github.com:443\r\n")
    assert b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n" in wire
    step, _, later = feed_bytewise(hs, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03")
    assert step.done and step.rest + later == b"\x16\x03"


def test_udp_associate_and_relay_address():
    hs = Handshake(SOCKS, "0.0.0.0", 0, command=socks5.UDP_ASSOCIATE)
    hs.start()
    assert hs.feed(b"\x05\x00").send == b"\x05\x03\x00\x01" + bytes(6)
    step = hs.feed(b"\x05\x00\x00\x01" + bytes(4) + b"\x13\x88")
    assert step.done and step.bound == ("0.0.0.0", 5000)
    assert udp_relay_address(step.bound, ("198.51.100.7", 1080)) == ("198.51.100.7", 5000)
    assert udp_relay_address(("198.51.100.9", 5001), ("198.51.100.7", 1080)) == ("198.51.100.9", 5001)
    assert udp_relay_address(("::", 5001), ("2001:db8::7", 1080)) == ("2001:db8::7", 5001)


def test_active_checks():
    socks_check = Handshake(SOCKS_AUTH, check=True)
    socks_check.start()
    socks_check.feed(b"\x05\x02")
    assert socks_check.feed(b"\x01\x00").done  # greeting and auth: no request
    http_check = Handshake(HTTPUP, check=True)
    assert http_check.start().startswith(b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\n")
    assert http_check.feed(b"HTTP/1.0 200 OK\r\n\r\n").done
    bare = Handshake(Upstream(name="w", type="http", host="198.51.100.8", port=3128), check=True)
    assert not bare.needs_exchange and bare.start() == b"" and bare.state == DONE


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([SOCKS, SOCKS_AUTH, HTTPUP]), st.booleans(),
       st.lists(st.one_of(st.binary(max_size=40),
                          st.sampled_from([b"\x05\x00", b"\x05\x02", b"\x01\x00", OK_REPLY,
                                           b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n", b"\x05\x00\x00\x03"])),
                max_size=12))
def test_any_reply_ends_in_a_step_or_a_handshake_error(upstream, check, chunks):
    hs = Handshake(upstream, "198.18.2.2", 443, check=check)
    hs.start()
    with contextlib.suppress(HandshakeError):
        for chunk in chunks:
            if hs.state == DONE:
                break
            step = hs.feed(chunk)
            assert step.done == (hs.state == DONE)
