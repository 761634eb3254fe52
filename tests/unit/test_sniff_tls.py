"""TLS ClientHello server_name: real captures (curl, openssl s_client with several key-share
groups, Python's ssl; tests/data/tls/record.sh) and generated ones, whole, split at every byte,
cut into many records, with GREASE, post-quantum key shares, ECH, no SNI, truncated, garbage."""

from __future__ import annotations

import contextlib
import importlib.util
from types import ModuleType

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.unit.tlsgen import (
    GREASE,
    capture,
    client_hello,
    ech,
    ext,
    key_share,
    post_quantum,
    records,
    sni,
    unrecord,
)
from tproxyd.relay.sniff import MAX_SNIFF, NEED_MORE, NO_NAME, sniff_stream
from tproxyd.relay.sniff_tls import TlsError, client_hello_name, sniff_tls


def sniff_source() -> ModuleType:
    """relay/sniff.py loaded from its source: the compiled StreamSniff calls sniff_stream
    natively, so only the source's calls can be counted by patching the module. Both are built
    from the same code; the tests below count its parses."""
    import tproxyd.relay.native as native

    spec = importlib.util.spec_from_file_location("tproxyd.relay.sniff_source",
                                                  native.HERE / "sniff.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CAPTURES = {
    "curl-tls13.bin": "www.example.com",
    "curl-tls12.bin": "mixed.example.org",  # curl sent "Mixed.Example.ORG": matched lowercased
    "openssl-x25519.bin": "sni-x25519.example.net",
    "openssl-p-256.bin": "sni-p-256.example.net",
    "openssl-x25519-p-256.bin": "sni-x25519-p-256.example.net",
    "openssl-p-384-p-521.bin": "sni-p-384-p-521.example.net",
    "openssl-x448.bin": "sni-x448.example.net",
    "openssl-ffdhe2048.bin": "sni-ffdhe2048.example.net",
    "openssl-ffdhe8192-records.bin": "big.example.net",  # 1568 bytes in 4 records
    "openssl-nosni.bin": NO_NAME,
    "python-ssl.bin": "python.example.com",
    "python-ssl-large.bin": "large.python.example",  # 1811 bytes in one record
}


def assert_prefixes(stream: bytes, expected, upto: int | None = None) -> None:
    """Every prefix answers NEED_MORE until the answer, then the answer: what the relay sees
    when the bytes arrive one at a time."""
    settled = False
    for cut in range(min(len(stream), upto or len(stream)) + 1):
        got = sniff_tls(stream[:cut])
        if settled:
            assert got == expected, cut
        else:
            assert got in (NEED_MORE, expected), cut
            settled = got == expected
    assert sniff_tls(stream) == sniff_stream(stream) == expected


@pytest.mark.parametrize("name, expected", CAPTURES.items())
def test_real_captures_split_at_every_offset(name, expected):
    assert_prefixes(capture(name), expected)


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("size", [1, 5, 100, 512])
def test_real_captures_cut_into_many_records(name, size):
    stream = records(unrecord(capture(name)), size)
    assert_prefixes(stream, CAPTURES[name], upto=600)
    assert sniff_tls(stream) == CAPTURES[name]


def test_captures_are_what_they_claim():
    assert len(capture("openssl-ffdhe8192-records.bin")) > 1500
    assert len(capture("python-ssl-large.bin")) > 1500
    stream = capture("openssl-ffdhe8192-records.bin")
    assert stream[0] == 0x16 and int.from_bytes(stream[3:5], "big") == 512  # several records


def test_post_quantum_hello_in_two_segments_and_several_records():
    hello = client_hello([ext(GREASE, b""), post_quantum(), ext(0x0015, bytes(300)),  # padding
                          sni(b"pq.example.com"), ext(0x002B, b"\x04\x03\x04\x03\x03")])
    assert 1500 < len(hello) < 2000
    for stream in (records(hello), records(hello, 1000), records(hello, 1)):
        assert sniff_tls(stream[:1448]) is NEED_MORE  # the first TCP segment: the name is later
        assert sniff_tls(stream) == "pq.example.com"


def test_name_found_before_the_rest_of_the_hello_arrives():
    hello = client_hello([sni(b"early.example"), key_share((0x11EC, 1216))])
    stream = records(hello)
    cut = stream.index(b"early.example") + len(b"early.example")
    assert sniff_tls(stream[:cut - 1]) is NEED_MORE
    assert sniff_tls(stream[:cut]) == "early.example"


def test_ech_outer_name_is_used():
    assert sniff_tls(records(client_hello(ech(b"cloudflare-ech.com")))) == "cloudflare-ech.com"


@pytest.mark.parametrize("extensions, expected", [
    ([], NO_NAME),
    ([ext(GREASE, b"\x00"), sni(b"grease.example"), ext(0x1A1A, b"")], "grease.example"),
    ([sni(b"a.example", b"b.example")], "a.example"),  # the first host_name
    ([sni(b"Upper.Example.")], "upper.example"),
    ([sni(b"198.51.100.7")], NO_NAME),  # an address is no name
    ([sni(b"caf\xc3\xa9.example")], NO_NAME),  # RFC 6066: A-labels only
    ([sni(b"x" * 64 + b".example")], NO_NAME),
    ([ext(0x0010, b"\x00\x03\x02h2")], NO_NAME),  # ALPN but no SNI
])
def test_generated_hellos(extensions, expected):
    assert sniff_tls(records(client_hello(extensions))) == expected


def test_hello_without_extensions_block():
    body = b"\x03\x01" + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    assert client_hello_name(b"\x01" + len(body).to_bytes(3, "big") + body) is NO_NAME


@pytest.mark.parametrize("stream, words", [
    (records(b"\x02\x00\x00\x04" + bytes(4)), "not a ClientHello"),
    (b"\x16\x03\x01\x00\x00", "record length 0"),
    (b"\x16\x02\x00\x00\x05" + bytes(5), "is not TLS"),
    (records(client_hello([sni(b"x.example")]), 40)[:45] + b"\x17\x03\x03\x00\x01\x00", "record type 23"),
    (records(b"\x01\x00\x00\x06\x03\x03\x00\x00\x00\x00"), "ends inside a field"),
    (records(b"\x01\x00\x00\x26\x03\x03" + bytes(32) + b"\x21"), "session id of 33"),
    (records(b"\x01\x00\x00\x29\x03\x03" + bytes(33) + b"\x00\x01\x00\x01\x00"), "cipher suites of 1"),
])
def test_malformed_raises_tls_error(stream, words):
    with pytest.raises(TlsError, match=words):
        sniff_tls(stream)
    assert sniff_stream(stream) is NO_NAME


def test_truncated_stream_waits_then_gives_up_at_the_bound():
    hello = client_hello([ext(0x0015, bytes(20000)), sni(b"late.example")])
    stream = records(hello)
    assert sniff_tls(stream[:MAX_SNIFF - 1]) is NEED_MORE
    assert sniff_tls(stream[:MAX_SNIFF]) is NO_NAME
    assert sniff_tls(stream) == "late.example"  # had it all been read, it would be found


def test_not_tls_is_no_name_at_once():
    assert sniff_tls(b"\x17\x03\x03") is NO_NAME
    assert sniff_tls(b"") is NEED_MORE
    assert sniff_stream(b"\x00\x01") is NO_NAME


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
@example(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01")
def test_garbage_raises_only_tls_error(tail):
    for stream in (b"\x16\x03\x01" + tail, b"\x16" + tail, tail):
        try:
            result = sniff_tls(stream)
        except TlsError:
            continue
        assert result in (NEED_MORE, NO_NAME) or isinstance(result, str)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(CAPTURES)), st.data())
def test_mutated_captures_raise_only_tls_error(name, data):
    stream = bytearray(capture(name))
    for _ in range(data.draw(st.integers(1, 4))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    with contextlib.suppress(TlsError):
        sniff_tls(bytes(stream[:cut]))


def test_stream_sniff_keeps_every_byte_and_settles():
    from tproxyd.relay.sniff import StreamSniff

    stream = capture("openssl-ffdhe8192-records.bin")
    sniff = StreamSniff(deadline=1.0)
    for i in range(0, len(stream), 50):  # one write per 50 bytes, as the tiny-segment client
        if sniff.feed(stream[i:i + 50]) is not NEED_MORE:
            break
    assert sniff.name == "big.example.net"
    assert bytes(sniff.data) == stream[:len(sniff.data)]
    server_first = StreamSniff(deadline=1.0)
    assert server_first.name is None and server_first.give_up() is NO_NAME  # nothing came
    ssh = StreamSniff(deadline=1.0)
    assert ssh.feed(b"SSH-2.0-OpenSSH_9.2\r\n") is NO_NAME and ssh.give_up() is NO_NAME


@pytest.mark.parametrize("name", sorted(CAPTURES))
@pytest.mark.parametrize("size", [1, 50])
def test_stream_sniff_settles_when_the_hello_is_complete(name, size):
    """Fed in pieces (1 byte: the worst client; 50: the issue's tiny segments), re-cut into
    100-byte records: the answer is there when the last byte of the ClientHello is."""
    from tproxyd.relay.sniff import StreamSniff

    stream = records(unrecord(capture(name)), 100)
    sniff = StreamSniff(deadline=1.0)
    for i in range(0, len(stream), size):
        sniff.feed(stream[i:i + size])
    assert sniff.result == CAPTURES[name]


def test_stream_sniff_parses_a_trickle_a_logarithmic_number_of_times(monkeypatch):
    sniff_module = sniff_source()

    calls = []
    real = sniff_module.sniff_stream
    monkeypatch.setattr(sniff_module, "sniff_stream", lambda data: calls.append(len(data)) or real(data))
    hello = client_hello([ext(0x0015, bytes(20000)), sni(b"late.example")])
    for stream in (records(hello, 1), records(hello, 100), b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 4000):
        calls.clear()
        sniff = sniff_module.StreamSniff(deadline=1.0)
        for i in range(MAX_SNIFF):
            if sniff.feed(stream[i:i + 1]) is not NEED_MORE:
                break
        assert sniff.result is NO_NAME and len(calls) <= 20, len(calls)
    calls.clear()
    http = sniff_module.StreamSniff(deadline=1.0)
    request = b"GET / HTTP/1.1\r\nHost: h.example\r\nAccept: */*\r\n\r\n"
    for i in range(len(request)):
        http.feed(request[i:i + 1])
    assert http.name == "h.example"  # found by the blank line at the latest
    unparsed = sniff_module.StreamSniff(deadline=1.0)
    assert unparsed.feed(request[:20]) is NEED_MORE
    assert unparsed.feed(request[20:33]) is NEED_MORE  # Host is complete, but no parse was due
    assert unparsed.give_up() == "h.example"  # give_up parses what is there


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([*sorted(CAPTURES), "curl-http11.http", "curl-http-proxy.http"]),
       st.lists(st.integers(1, 700), min_size=1, max_size=40), st.integers(1, 512))
def test_stream_sniff_agrees_with_one_parse_of_everything(name, cuts, record):
    """However the bytes are cut into recv()s (and a TLS stream into records), the sniff ends
    where one parse of all of them would: its skipped parses never lose an answer."""
    from tproxyd.relay.sniff import StreamSniff

    stream = capture(name)
    if stream[0] == 0x16:
        stream = records(unrecord(stream), record)
    sniff = StreamSniff(deadline=1.0)
    pos = 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        if pos >= len(stream) or sniff.result is not NEED_MORE:
            break
        sniff.feed(stream[pos:pos + size])
        pos += size
    full = sniff_stream(bytes(sniff.data))
    assert sniff.give_up() == (NO_NAME if full is NEED_MORE else full)
    assert sniff.result == sniff_stream(stream)


def python_client_hello(server_name: str, alpn: list[str] | None = None) -> bytes:
    """What Python's ssl (OpenSSL) sends first, through a MemoryBIO: a real client, no socket."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(LABEL, min_size=1, max_size=4), st.sampled_from(["com", "example", "Net", "xn--p1ai"]),
       st.integers(0, 6))
def test_python_ssl_hellos_for_any_name(labels, tld, alpns):
    name = ".".join([*labels, tld])
    stream = python_client_hello(name, [chr(97 + i) * 250 for i in range(alpns)] or None)
    assert sniff_stream(stream) == name.lower()
    assert sniff_stream(records(unrecord(stream), 300)) == name.lower()


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_a_seeded_sniff_parses_its_first_segment_once_and_settles_on_the_rest(name, monkeypatch):
    """The relay parses a connection's first read itself (relay/sniffing.py's begin()); a
    ClientHello that spans two segments (post-quantum key shares) is seeded with that read and
    its answer, so the first segment is not parsed again, and the second settles the name."""
    sniff_module = sniff_source()

    stream = capture(name)
    first, rest = stream[:60], stream[60:]  # cut inside the ClientHello's random
    assert sniff_stream(first) is NEED_MORE
    calls = []
    real = sniff_module.sniff_stream
    monkeypatch.setattr(sniff_module, "sniff_stream", lambda data: calls.append(len(data)) or real(data))
    sniff = sniff_module.StreamSniff(deadline=1.0)
    sniff.seed(first)
    assert sniff.result is NEED_MORE and calls == []
    assert sniff.feed(rest) == CAPTURES[name]
    assert calls == [len(stream)] and bytes(sniff.data) == stream
