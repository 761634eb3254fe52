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

from .sniff_base import MAX_SNIFF, NEED_MORE, NO_NAME, Result, Short, TlsError

HANDSHAKE = 0x16  # record content type
CLIENT_HELLO = 1
SERVER_NAME = 0x0000  # extension type
HOST_NAME = 0  # server_name's NameType
MAX_RECORD = (1 << 14) + 256  # RFC 8446 5.1 plaintext limit, with the slack old stacks use


def handshake_bytes(data: bytes) -> Tuple[bytes, bool]:
    """The handshake-layer bytes carried by the records at the start of data (the last record
    may be partial), and whether the first handshake message is all there."""
    if len(data) >= 9 and data[0] == HANDSHAKE and data[1] == 3:
        # the common case, one record holding the whole message: one slice, no joining
        length = data[3] << 8 | data[4]
        if 4 <= length <= MAX_RECORD and len(data) >= 5 + length \
                and length >= 4 + int.from_bytes(data[6:9], "big"):
            return bytes(data[5:5 + length]), True
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
        return _client_hello(hs)
    except Short:
        if complete:
            raise TlsError("the ClientHello ends inside a field") from None
        return NEED_MORE


def _client_hello(data: bytes) -> Result:
    """Field by field, with the position in a local and no slice but the server_name's: this
    runs once per sniffed connection (a reader object with a method call and a copy per field
    cost three times as much). Each `n < pos` is a field that is not all there yet: Short."""
    n = len(data)
    if n < 1:
        raise Short
    if data[0] != CLIENT_HELLO:
        raise TlsError(f"handshake type {data[0]}, not a ClientHello")
    if n < 6:
        raise Short
    end = 4 + int.from_bytes(data[1:4], "big")
    if data[4] != 3:
        raise TlsError(f"ClientHello version {data[4] << 8 | data[5]:#06x}")
    pos = 6 + 32  # random
    if n < pos + 1:
        raise Short
    session = data[pos]
    if session > 32:
        raise TlsError(f"session id of {session} bytes")
    pos += 1 + session
    if n < pos + 2:
        raise Short
    suites = data[pos] << 8 | data[pos + 1]
    if suites < 2 or suites % 2:
        raise TlsError(f"cipher suites of {suites} bytes")
    pos += 2 + suites
    if n < pos + 1:
        raise Short
    compressions = data[pos]
    if compressions < 1:
        raise TlsError("no compression methods")
    pos += 1 + compressions
    if n < pos:
        raise Short
    if pos == end:
        return NO_NAME  # no extensions (SSL 3.0 style): no name
    if n < pos + 2:
        raise Short
    extensions_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if extensions_end > end:
        raise TlsError("extensions run past the ClientHello")
    pos += 2
    while pos < extensions_end:
        if n < pos + 4:
            raise Short
        kind, size = data[pos] << 8 | data[pos + 1], data[pos + 2] << 8 | data[pos + 3]
        pos += 4
        if pos + size > extensions_end:
            raise TlsError(f"extension {kind:#06x} runs past the extensions")
        if n < pos + size:
            raise Short
        if kind == SERVER_NAME:
            return _server_name(data[pos:pos + size])
        pos += size
    return NO_NAME


def _server_name(ext: bytes) -> Result:
    n = len(ext)
    if n < 2:
        raise TlsError("server_name ends inside a field")
    if 2 + (ext[0] << 8 | ext[1]) != n:
        raise TlsError("server_name list length")
    pos = 2
    while pos < n:
        if n < pos + 3:
            raise TlsError("server_name ends inside a field")
        kind, size = ext[pos], ext[pos + 1] << 8 | ext[pos + 2]
        pos += 3
        if n < pos + size:
            raise TlsError("server_name ends inside a field")
        if kind == HOST_NAME:
            # RFC 6066: ASCII A-labels, no trailing dot; anything else is no name to route on
            name = ext[pos:pos + size]
            if not name.isascii():
                return NO_NAME
            found = sniffed(name.decode("ascii"))
            return NO_NAME if found is None else found
        pos += size
    return NO_NAME
