"""TLS ClientHello server_name (RFC 8446 4.1.2, RFC 6066 3), over any number of records.

The ClientHello is read from the handshake bytes carried by one or more records: since
post-quantum key shares (X25519MLKEM768, about 1.2 KB) a ClientHello is 1.5-2 KB, spans two TCP
segments, and some stacks cut it into several records. Records are joined, and the ClientHello is
parsed as far as the bytes go: a name early in it is found before the rest has arrived.

With Encrypted Client Hello (ECH) the server_name seen is the outer ClientHello's public name,
which is what can be routed on: the inner one is encrypted to the server.
"""

from __future__ import annotations

from typing import Tuple

from tproxyd.state.domains import sniffed

from .sniff_base import MAX_SNIFF, NEED_MORE, NO_NAME, Result, SniffError

HANDSHAKE = 0x16  # record content type
CLIENT_HELLO = 1
SERVER_NAME = 0x0000  # extension type
HOST_NAME = 0  # server_name's NameType
MAX_RECORD = (1 << 14) + 256  # RFC 8446 5.1 plaintext limit, with the slack old stacks use


class TlsError(SniffError):
    pass


class _Short(Exception):
    """The bytes end inside a field: more may come (not an error)."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def handshake_bytes(data: bytes) -> Tuple[bytes, bool]:
    """The handshake-layer bytes carried by the records at the start of data (the last record
    may be partial), and whether the first handshake message is all there."""
    out = bytearray()
    pos = 0
    while len(data) - pos >= 5:
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != HANDSHAKE:
            raise TlsError(f"record type {ctype} before the ClientHello ended")
        if major != 3:
            raise TlsError(f"record version {major}.{data[pos + 2]} is not TLS")
        if not 0 < length <= MAX_RECORD:  # RFC 8446 5.1: no empty handshake fragments
            raise TlsError(f"record length {length}")
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            return bytes(out), True
    return bytes(out), False


def sniff_tls(data: bytes) -> Result:
    """The server_name of the ClientHello at the start of a TLS stream."""
    if not data:
        return NEED_MORE
    if data[0] != HANDSHAKE:
        return NO_NAME
    hs, complete = handshake_bytes(data)
    result = client_hello_name(hs, complete)
    if result is NEED_MORE and len(data) >= MAX_SNIFF:
        return NO_NAME
    return result


def client_hello_name(hs: bytes, complete: bool = True) -> Result:
    """The server_name in a handshake message (type, 3-byte length, body), as far as hs goes.
    complete: hs holds the whole message (then running out is an error, not NEED_MORE). Shared
    with QUIC, whose CRYPTO frames carry the same message without records."""
    try:
        return _client_hello(_Reader(hs))
    except _Short:
        if complete:
            raise TlsError("the ClientHello ends inside a field") from None
        return NEED_MORE


def _client_hello(r: _Reader) -> Result:
    kind = r.int(1)
    if kind != CLIENT_HELLO:
        raise TlsError(f"handshake type {kind}, not a ClientHello")
    length = r.int(3)
    end = r.pos + length
    version = r.int(2)
    if version >> 8 != 3:
        raise TlsError(f"ClientHello version {version:#06x}")
    r.take(32)  # random
    session = r.int(1)
    if session > 32:
        raise TlsError(f"session id of {session} bytes")
    r.take(session)
    suites = r.int(2)
    if suites < 2 or suites % 2:
        raise TlsError(f"cipher suites of {suites} bytes")
    r.take(suites)
    compressions = r.int(1)
    if compressions < 1:
        raise TlsError("no compression methods")
    r.take(compressions)
    if r.pos == end:
        return NO_NAME  # no extensions (SSL 3.0 style): no name
    extensions_end = r.pos + 2 + r.int(2)
    if extensions_end > end:
        raise TlsError("extensions run past the ClientHello")
    while r.pos < extensions_end:
        kind = r.int(2)
        size = r.int(2)
        if r.pos + size > extensions_end:
            raise TlsError(f"extension {kind:#06x} runs past the extensions")
        if kind == SERVER_NAME:
            return _server_name(r.take(size))
        r.take(size)
    return NO_NAME


def _server_name(ext: bytes) -> Result:
    r = _Reader(ext)
    try:
        end = 2 + r.int(2)
        if end != len(ext):
            raise TlsError("server_name list length")
        while r.pos < end:
            kind = r.int(1)
            name = r.take(r.int(2))
            if kind == HOST_NAME:
                # RFC 6066: ASCII A-labels, no trailing dot; anything else is no name to route on
                if not name.isascii():
                    return NO_NAME
                found = sniffed(name.decode("ascii"))
                return NO_NAME if found is None else found
    except _Short:
        raise TlsError("server_name ends inside a field") from None
    return NO_NAME
