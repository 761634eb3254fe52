"""QUIC v1 Initial: RFC 9001 appendix A.2's client Initial (SNI example.com), and Initials built
here around recorded ClientHellos: CRYPTO frames out of order, split across Initial packets in
one datagram and across datagrams; altered, foreign and garbage packets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.tlsgen import (
    DATA,
    capture,
    client_hello,
    crypto_frame,
    initial,
    post_quantum,
    rfc9001_initial,
    sni,
    unrecord,
)
from tproxyd.relay import sniff_quic as quic
from tproxyd.relay.sniff import NEED_MORE, NO_NAME, sniff_datagrams
from tproxyd.relay.sniff_quic import QuicError, initial_frames, reassemble, sniff_quic

DCID = bytes.fromhex("8394c8f03e515708")


def test_rfc9001_keys_and_sample_packet():
    keys = quic.Keys(DCID)
    assert keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"  # RFC 9001 A.1 client iv
    assert keys.mask(bytes.fromhex("d1b1c98dd7689fb8ec11d242b123dc9b"))[:5].hex() == "437b9aec36"
    packet = rfc9001_initial()
    assert len(packet) == 1200
    ((offset, data),) = initial_frames(packet)
    assert offset == 0 and data[:4] == bytes.fromhex("010000ed")  # a 241-byte ClientHello
    assert sniff_quic(packet) == sniff_datagrams([packet]) == "example.com"


def test_altered_packet_does_not_decrypt():
    packet = bytearray(rfc9001_initial())
    packet[600] ^= 1
    with pytest.raises(QuicError, match="does not decrypt"):
        sniff_quic(bytes(packet))
    assert sniff_datagrams([bytes(packet)]) is NO_NAME


def recorded_hello(name: str = "curl-tls13.bin") -> bytes:
    return unrecord(capture(name))


def test_recorded_hello_in_one_initial():
    packet = initial(b"\x11" * 8, 0, crypto_frame(0, recorded_hello()), pad_to=1200)
    assert len(packet) == 1200
    assert sniff_quic(packet) == "www.example.com"


def test_crypto_frames_out_of_order_in_one_packet():
    hello = recorded_hello("openssl-x25519-p-256.bin")
    pieces = [(i, hello[i:i + 37]) for i in range(0, len(hello), 37)]
    random.Random(1).shuffle(pieces)
    frames = b"".join(crypto_frame(o, d) for o, d in pieces)
    assert sniff_quic(initial(b"\x22" * 8, 0, frames, pad_to=1200)) == "sni-x25519-p-256.example.net"


def test_post_quantum_hello_over_two_coalesced_packets_and_two_datagrams():
    hello = client_hello([post_quantum(), sni(b"h3.example.com")])  # ~1.4 KB: more than one packet
    dcid = b"\x33" * 12
    first, second = hello[:1000], hello[1000:]
    # the second half first: order of frames and of packets does not matter
    one = (initial(dcid, 1, crypto_frame(1000, second), token=b"tok")
           + initial(dcid, 0, crypto_frame(0, first)))
    assert sniff_quic(one) == "h3.example.com"
    late = client_hello([post_quantum(), sni(b"late.example.com")])
    a = initial(dcid, 0, crypto_frame(0, late[:1100]), pad_to=1200)
    b = initial(dcid, 1, b"\x02\x00\x00\x00\x00" + crypto_frame(1100, late[1100:]), pad_to=1200)  # + ACK
    assert sniff_quic(a) is NEED_MORE  # the name is in the part still to come
    assert sniff_quic([a, b]) == sniff_quic([b, a]) == "late.example.com"
    assert sniff_quic([b]) is NEED_MORE  # nothing from offset 0 yet


def test_handshake_packet_coalesced_after_the_initial_is_skipped():
    packet = initial(b"\x44" * 8, 0, crypto_frame(0, recorded_hello()), pad_to=1150)
    handshake = (bytes([0xE1]) + (1).to_bytes(4, "big") + b"\x08" + b"\x44" * 8 + b"\x00"
                 + b"\x40\x20" + bytes(32))
    assert sniff_quic(packet + handshake + b"\x40" + bytes(30)) == "www.example.com"


@pytest.mark.parametrize("datagram, words", [
    (b"\xc0\x6b\x33\x43\xcf" + bytes(40), "is not QUIC version 1"),  # QUIC v2: not read
    (b"\xc0\x00\x00\x00\x00" + bytes(40), "is not QUIC version 1"),  # version negotiation
    (b"\xc0\x00\x00\x00\x01\x15" + bytes(40), "connection ID"),
    (b"\xc0\x00\x00\x00\x01\x04" + bytes(40), "at least 8 bytes"),
    (b"\xc0\x00\x00\x00\x01\x08" + bytes(8) + b"\x00\x00\x44\x00" + bytes(40), "runs past"),
    (b"\xc0\x00\x00", "truncated"),
])
def test_not_an_initial(datagram, words):
    with pytest.raises(QuicError, match=words):
        sniff_quic(datagram)


def test_short_header_and_empty():
    assert sniff_quic(b"\x40" + bytes(30)) is NO_NAME  # 1-RTT: a flow seen mid-way, no Initial
    assert sniff_quic([]) is NO_NAME
    assert sniff_quic(initial(b"\x77" * 8, 0, b"\x01", pad_to=1200)) is NO_NAME  # PING, no CRYPTO


def test_initial_in_a_short_datagram_is_refused():
    # RFC 9000 14.1: a client pads every datagram with an Initial to 1200 bytes
    with pytest.raises(QuicError, match="not at least 1200"):
        sniff_quic(initial(b"\x77" * 8, 0, crypto_frame(0, recorded_hello()), pad_to=1199))


def test_frames_that_cannot_be_in_an_initial():
    with pytest.raises(QuicError, match="frame type 0x8"):
        sniff_quic(initial(b"\x55" * 8, 0, b"\x08\x00\x00\x00", pad_to=1200))  # a STREAM frame


def test_reassembly():
    assert reassemble([(5, b"fghij"), (0, b"abcde")]) == b"abcdefghij"
    assert reassemble([(0, b"abc"), (5, b"fgh")]) == b"abc"
    assert reassemble([(0, b"abcdef"), (2, b"cd")]) == b"abcdef"  # a retransmission
    assert reassemble([(0, b"abc"), (2, b"cdef")]) == b"abcdef"
    with pytest.raises(QuicError, match="disagree"):
        reassemble([(0, b"abcdef"), (2, b"xx")])
    with pytest.raises(QuicError, match="disagree"):
        reassemble([(0, b"abc"), (2, b"xyz")])
    assert len(reassemble([(0, b"a" * 20000)])) == 16384


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1300), st.sampled_from([b"", b"\xc0\x00\x00\x00\x01\x08", b"\xc3\x00\x00\x00\x01"]))
def test_garbage_raises_only_quic_error(tail, head):
    try:
        result = sniff_quic(head + tail)
    except QuicError:
        return
    assert result in (NEED_MORE, NO_NAME) or isinstance(result, str)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_garbage_inside_a_valid_initial_raises_only_quic_error(data):
    """Decryptable packets whose frames or ClientHello are nonsense: the layer a fuzzer of the
    outer bytes cannot reach (every altered ciphertext fails its tag first)."""
    frames = data.draw(st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=300).map(lambda b: crypto_frame(0, b"\x01" + b)),
        st.builds(lambda o, b: crypto_frame(o, b), st.integers(0, 1 << 20), st.binary(max_size=50)),
    ))
    try:
        result = sniff_quic(initial(b"\x66" * 8, 0, frames, pad_to=1200))
    except QuicError:
        return
    assert result in (NEED_MORE, NO_NAME) or isinstance(result, str)


def test_datagram_sniff():
    from tproxyd.relay.sniff import DatagramSniff

    late = client_hello([post_quantum(), sni(b"late.example.com")])
    a = initial(b"\x88" * 8, 0, crypto_frame(0, late[:1100]), pad_to=1200)
    b = initial(b"\x88" * 8, 1, crypto_frame(1100, late[1100:]), pad_to=1200)
    sniff = DatagramSniff(deadline=1.0)
    assert sniff.add(a) is NEED_MORE
    assert sniff.add(b) == "late.example.com" == sniff.name
    assert sniff.datagrams == [a, b]
    stuck = DatagramSniff(deadline=1.0)
    for _ in range(14):
        result = stuck.add(a)
    assert result is NO_NAME  # 16 KiB of datagrams without the rest of the ClientHello
    assert DatagramSniff(1.0).give_up() is NO_NAME


def recorded(name: str) -> list[bytes]:
    text = (DATA / "quic" / name).read_text()
    return [bytes.fromhex(ln) for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_recorded_aioquic_initial():
    (datagram,) = recorded("aioquic-h3.hex")
    assert len(datagram) == 1200
    assert sniff_quic(datagram) == "quic.example.com"


def test_recorded_aioquic_hello_over_two_datagrams():
    first, second = recorded("aioquic-two-datagrams.hex")  # a 1987-byte ClientHello
    frames = initial_frames(first) + initial_frames(second)
    assert [(o, len(d)) for o, d in frames] == [(0, 1152), (1152, 835)]
    assert sniff_quic([first, second]) == sniff_quic([second, first]) == "big.quic.example.org"
    assert sniff_quic(first) == "big.quic.example.org"  # the name is in the first part
    assert sniff_quic(second) is NEED_MORE  # nothing from offset 0
