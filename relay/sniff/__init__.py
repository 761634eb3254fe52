"""Sniffing: the name a client is after, read from its first bytes (issue 13).

Pure functions over bytes, kept apart from the loop like socks5.py and httpconnect.py: each
takes everything received so far and answers NEED_MORE (call again with more), NO_NAME (this
connection routes without a name) or the name, lowercase, as state.domains.sniffed() keys it.
Each stops at MAX_SNIFF bytes, the bound the relay buffers before it gives up on a name.

Why in relay/ and not state/: they parse wire formats from clients in the relay's hot path, next
to the SOCKS5 and CONNECT parsers that later carry the name; state/ holds config and desired
state and needs none of them (it only normalises and matches the names they return).

Each module raises only its own error (TlsError, HttpError, QuicError, all SniffError) on bytes
that claim its protocol but break it; sniff_stream() and sniff_datagrams() turn those into
NO_NAME, so the relay has nothing to catch: a broken ClientHello goes on to the server as it
would without tproxyd, and fails there.
"""

from __future__ import annotations

from typing import Sequence

from . import http, quic, tls
from .common import MAX_SNIFF, NEED_MORE, NO_NAME, Result, Sniff, SniffError

__all__ = ["MAX_SNIFF", "NEED_MORE", "NO_NAME", "Result", "Sniff", "SniffError", "sniff_datagrams",
           "sniff_stream"]


def sniff_stream(data: bytes) -> Result:
    """A TCP client's first bytes: TLS (record type 22) or HTTP/1.x (a request line), decided by
    the first byte; anything else NO_NAME at once. Never raises."""
    if not data:
        return NEED_MORE
    try:
        if data[0] == tls.HANDSHAKE:
            return tls.sniff_tls(data)
        return http.sniff_http(data)
    except SniffError:
        return NO_NAME


def sniff_datagrams(datagrams: Sequence[bytes]) -> Result:
    """A UDP client's first datagrams to port 443: QUIC Initial packets (see quic.py). NO_NAME
    for anything else, and when python3-cryptography is missing (quic.AVAILABLE). Never raises."""
    try:
        return quic.sniff_quic(datagrams)
    except SniffError:
        return NO_NAME
