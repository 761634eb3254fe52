"""Builders for sniffer tests: ClientHellos with chosen extensions, records of chosen sizes, and
QUIC version 1 client Initial packets protected as RFC 9001 5 says (the client's side of what
relay/sniff_quic.py opens)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from tproxyd.relay import sniff_quic as quic

DATA = Path(__file__).resolve().parent.parent / "data"

GREASE = 0x0A0A
X25519, X25519MLKEM768 = 0x001D, 0x11EC
ECH = 0xFE0D


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(kind: int, body: bytes) -> bytes:
    return u16(kind) + u16(len(body)) + body


def sni(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def key_share(*groups: Tuple[int, int]) -> bytes:
    """key_share with (group, key size) entries: X25519MLKEM768 is 1216 bytes, X25519 32."""
    shares = b"".join(u16(g) + u16(size) + os.urandom(size) for g, size in groups)
    return ext(0x0033, u16(len(shares)) + shares)


def post_quantum() -> bytes:
    """What Chrome and Firefox send since 2024: GREASE, X25519MLKEM768 and X25519 shares."""
    return key_share((GREASE, 1), (X25519MLKEM768, 1216), (X25519, 32))


def ech(outer: bytes = b"public.example") -> List[bytes]:
    """An ECH outer ClientHello's extensions: the public name in SNI, the inner one encrypted."""
    return [sni(outer), ext(ECH, b"\x00\x00\x01\x00\x01\x42\x00\x20" + os.urandom(32)
                          + u16(240) + os.urandom(240))]


def client_hello(extensions: Iterable[bytes] = (), suites: Sequence[int] = (GREASE, 0x1301, 0x1302),
                 session: bytes = b"\x11" * 32) -> bytes:
    """A handshake message (type 1, length, body)."""
    exts = b"".join(extensions)
    body = (b"\x03\x03" + os.urandom(32) + bytes([len(session)]) + session
            + u16(2 * len(suites)) + b"".join(map(u16, suites)) + b"\x01\x00" + u16(len(exts)) + exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int = 16384, version: int = 0x0301) -> bytes:
    """The handshake bytes cut into records of at most `size` bytes."""
    return b"".join(b"\x16" + u16(version) + u16(len(handshake[i:i + size])) + handshake[i:i + size]
                    for i in range(0, len(handshake), size))


def unrecord(stream: bytes) -> bytes:
    """The handshake bytes of a captured stream of handshake records."""
    out, pos = b"", 0
    while pos + 5 <= len(stream):
        length = int.from_bytes(stream[pos + 3:pos + 5], "big")
        out += stream[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def capture(name: str) -> bytes:
    return (DATA / "tls" / name).read_bytes()


def rfc9001_initial() -> bytes:
    text = (DATA / "quic" / "rfc9001-a2-client-initial.hex").read_text()
    return bytes.fromhex("".join(ln for ln in text.splitlines() if not ln.startswith("#")))


# --- QUIC -------------------------------------------------------------------------------------

def varint(value: int) -> bytes:
    for size, prefix in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | (prefix << (8 * size - 8))).to_bytes(size, "big")
    raise ValueError(value)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(dcid: bytes, number: int, frames: bytes, scid: bytes = b"\x01\x02\x03\x04",
            token: bytes = b"", pad_to: int = 0) -> bytes:
    """One protected client Initial packet (2-byte packet number), its payload padded with
    PADDING frames so the packet is pad_to bytes long (a first datagram must be 1200)."""
    keys = quic.Keys(dcid)
    head = (bytes([0xC1]) + quic.VERSION_1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
            + bytes([len(scid)]) + scid + varint(len(token)) + token)
    fixed = len(head) + 2 + 2 + 16  # Length (2-byte varint), packet number, AEAD tag
    payload = frames + b"\x00" * max(0, pad_to - fixed - len(frames), 20 - len(frames))
    header = head + (0x4000 | (2 + len(payload) + 16)).to_bytes(2, "big")
    pn_at = len(header)
    header += (number & 0xFFFF).to_bytes(2, "big")
    sealed = keys.aead.encrypt(keys.nonce(number), payload, header)
    mask = keys.mask(sealed[2:18])  # the sample starts 4 bytes after the packet number's start
    first = header[0] ^ (mask[0] & 0x0F)
    pn = bytes(b ^ m for b, m in zip(header[pn_at:], mask[1:3]))
    return bytes([first]) + header[1:pn_at] + pn + sealed
