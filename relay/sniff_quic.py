"""QUIC version 1 Initial packets: the ClientHello's server_name (RFC 9000 17.2.2, RFC 9001 5).

Initial packets are encrypted with keys anyone can derive from the packet's own Destination
Connection ID and a published salt (RFC 9001 5.2): they protect against tampering, not reading.
Per datagram: remove header protection (AES-ECB of a sample of the ciphertext), open the payload
(AES-128-GCM), collect its CRYPTO frames. The frames of several Initial packets (coalesced in one
datagram, or in the client's next datagrams, as a 1.5-2 KB post-quantum ClientHello needs) are put
together by offset, in whatever order they came, and the contiguous prefix from offset 0 is
parsed as a TLS handshake message (sniff_tls.client_hello_name).

Needs python3-cryptography (AES); without it AVAILABLE is False and every answer is NO_NAME:
QUIC is then routed without a name, and `tproxy check` should say so.
"""

from __future__ import annotations

import hmac
from typing import Dict, Iterable, List, Tuple, Union

from .sniff_base import MAX_SNIFF, NEED_MORE, NO_NAME, Result, SniffError
from .sniff_tls import TlsError, client_hello_name

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without python3-cryptography
    AVAILABLE = False

VERSION_1 = 0x00000001
SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")  # RFC 9001 5.2
MAX_CID = 20
MIN_INITIAL_DATAGRAM = 1200
PADDING, PING, ACK, ACK_ECN, CRYPTO, CONNECTION_CLOSE = 0x00, 0x01, 0x02, 0x03, 0x06, 0x1C


class QuicError(SniffError):
    pass


class Keys:
    """The client's Initial keys for one Destination Connection ID."""

    __slots__ = ("aead", "hp", "iv")

    def __init__(self, dcid: bytes) -> None:
        client = _expand_label(hmac.digest(SALT_V1, dcid, "sha256"), b"client in", 32)  # HKDF-Extract
        self.aead = AESGCM(_expand_label(client, b"quic key", 16))
        self.iv = _expand_label(client, b"quic iv", 12)
        self.hp = Cipher(algorithms.AES(_expand_label(client, b"quic hp", 16)), modes.ECB())

    def mask(self, sample: bytes) -> bytes:
        enc = self.hp.encryptor()
        return enc.update(sample) + enc.finalize()

    def nonce(self, number: int) -> bytes:
        return (int.from_bytes(self.iv, "big") ^ number).to_bytes(12, "big")


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with an empty context: one HMAC block is enough for
    every length here (<= 32). The stdlib's hmac, in C, costs a fraction of cryptography's HKDF
    objects, and this runs once per new QUIC flow."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    """(value, next position) of the RFC 9000 16 variable-length integer at data[pos]."""
    if pos >= len(data):
        raise QuicError("ends inside a variable-length integer")
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        raise QuicError("ends inside a variable-length integer")
    value = int.from_bytes(data[pos:pos + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size


def initial_frames(datagram: bytes) -> List[Tuple[int, bytes]]:
    """The (offset, data) of every CRYPTO frame in the client Initial packets of one datagram.
    Raises QuicError when the first packet is not a version 1 Initial or any Initial fails."""
    crypto: List[Tuple[int, bytes]] = []
    keys: Dict[bytes, Keys] = {}
    pos = 0
    while pos < len(datagram):
        first = datagram[pos]
        if not first & 0x80:
            break  # a short header: 1-RTT data, nothing more for us in this datagram
        if len(datagram) - pos < 7:
            raise QuicError("long header truncated")
        version = int.from_bytes(datagram[pos + 1:pos + 5], "big")
        if version != VERSION_1 or not first & 0x40:
            if pos == 0:
                raise QuicError(f"version {version:#010x} is not QUIC version 1")
            break  # another version coalesced after ours cannot be read: stop
        kind = (first >> 4) & 3
        at = pos + 5
        dcid_len = datagram[at]
        dcid = datagram[at + 1:at + 1 + dcid_len]
        at += 1 + dcid_len
        if dcid_len > MAX_CID or at >= len(datagram) or datagram[at] > MAX_CID:
            raise QuicError("connection ID too long or truncated")
        at += 1 + datagram[at]  # source connection ID
        if kind == 3:
            break  # Retry: no length field; a client never sends one
        if kind == 0:
            token_len, at = _varint(datagram, at)
            at += token_len
        length, at = _varint(datagram, at)
        end = at + length
        if end > len(datagram):
            raise QuicError("packet length runs past the datagram")
        if kind != 0:  # 0-RTT or Handshake coalesced after the Initial: not ours to read
            pos = end
            continue
        if pos == 0 and len(dcid) < 8:
            raise QuicError("a client's first Destination Connection ID has at least 8 bytes")
        if len(datagram) < MIN_INITIAL_DATAGRAM:
            # RFC 9000 14.1: servers drop these, so no client sends them; refusing them also
            # bounds the datagrams a sniff can be made to decrypt (16 KiB / 1200 bytes)
            raise QuicError(f"a datagram with an Initial packet has {len(datagram)} bytes, "
                            f"not at least {MIN_INITIAL_DATAGRAM}")
        k = keys.get(dcid) or keys.setdefault(dcid, Keys(dcid))
        crypto += _frames(_open(k, datagram, pos, at, end))
        pos = end
    return crypto


def _open(k: Keys, datagram: bytes, start: int, pn_at: int, end: int) -> bytes:
    if end - pn_at < 20:
        raise QuicError("packet too short to sample for header protection")
    mask = k.mask(datagram[pn_at + 4:pn_at + 20])
    first = datagram[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 3) + 1
    pn = bytes(b ^ m for b, m in zip(datagram[pn_at:pn_at + pn_len], mask[1:1 + pn_len]))
    header = bytes([first]) + datagram[start + 1:pn_at] + pn
    try:
        # the full packet number of a first flight is its truncated value (it starts at 0)
        return k.aead.decrypt(k.nonce(int.from_bytes(pn, "big")), datagram[pn_at + pn_len:end], header)
    except InvalidTag:
        raise QuicError("Initial packet does not decrypt (not a client Initial, or altered)") from None


def _frames(payload: bytes) -> List[Tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(payload):
        kind, pos = _varint(payload, pos)
        if kind == PADDING:  # a first datagram is mostly padding (1200 bytes): skip the run at once
            pos = len(payload) - len(payload[pos:].lstrip(b"\x00"))
            continue
        if kind == PING:
            continue
        if kind in (ACK, ACK_ECN):
            _, pos = _varint(payload, pos)  # largest acknowledged
            _, pos = _varint(payload, pos)  # delay
            ranges, pos = _varint(payload, pos)
            for _ in range(2 * ranges + 1 + (3 if kind == ACK_ECN else 0)):
                _, pos = _varint(payload, pos)
        elif kind == CRYPTO:
            offset, pos = _varint(payload, pos)
            size, pos = _varint(payload, pos)
            if pos + size > len(payload):
                raise QuicError("CRYPTO frame runs past the packet")
            out.append((offset, payload[pos:pos + size]))
            pos += size
        elif kind == CONNECTION_CLOSE:
            break
        else:
            raise QuicError(f"frame type {kind:#x} is not allowed in an Initial packet")
    return out


def reassemble(frames: Iterable[Tuple[int, bytes]], limit: int = MAX_SNIFF) -> bytes:
    """The contiguous CRYPTO stream from offset 0, up to limit bytes, whatever the frames' order;
    overlapping frames must agree (they are retransmissions of the same bytes)."""
    stream = bytearray()
    have = bytearray()  # 1 where stream holds a byte
    for offset, data in frames:
        if offset >= limit:
            continue
        data = data[:limit - offset]
        end = offset + len(data)
        if end > len(stream):
            stream.extend(bytes(end - len(stream)))
            have.extend(bytes(end - len(have)))
        held = have.count(1, offset, end)
        if (held == len(data) and stream[offset:end] != data) or (0 < held < len(data) and any(
                have[i] and stream[i] != byte for i, byte in enumerate(data, offset))):
            raise QuicError(f"CRYPTO frames at offset {offset} disagree with earlier ones")
        stream[offset:end] = data
        have[offset:end] = b"\x01" * len(data)
    gap = have.find(0)
    return bytes(stream if gap < 0 else stream[:gap])


def sniff_quic(datagrams: Union[bytes, Iterable[bytes]]) -> Result:
    """The server_name of the ClientHello in a client's first datagrams (one, or the first few
    in arrival order). NEED_MORE when the ClientHello continues beyond them; NO_NAME when they
    hold no Initial CRYPTO data at all."""
    if not AVAILABLE:
        return NO_NAME
    if isinstance(datagrams, (bytes, bytearray, memoryview)):
        datagrams = (bytes(datagrams),)
    frames: List[Tuple[int, bytes]] = []
    for datagram in datagrams:
        frames += initial_frames(bytes(datagram))
    return name_from_frames(frames)


def name_from_frames(frames: List[Tuple[int, bytes]]) -> Result:
    """sniff_quic() once the datagrams' CRYPTO frames are collected (a caller that receives
    datagrams one by one keeps the frames and decrypts each datagram once)."""
    if not frames:
        return NO_NAME  # no Initial with CRYPTO data (a 1-RTT packet of a flow seen mid-way)
    stream = reassemble(frames)
    if not stream:
        return NEED_MORE  # the frames so far start after offset 0: the client's next datagram
    try:
        result = client_hello_name(stream, complete=False)
    except TlsError as e:
        raise QuicError(f"CRYPTO data: {e}") from None
    if result is NEED_MORE and len(stream) >= MAX_SNIFF:
        return NO_NAME
    return result
