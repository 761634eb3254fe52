"""Sniffing: the name a client is after, read from its first bytes (issue 13).

Pure functions over bytes, kept apart from the loop like socks5.py and httpconnect.py: each
takes everything received so far and answers NEED_MORE (call again with more), NO_NAME (this
connection routes without a name) or the name, lowercase, as state.domains.sniffed() keys it.
Each stops at MAX_SNIFF bytes, the bound the relay buffers before it gives up on a name.

Why in relay/ and not state/: they parse wire formats from clients in the relay's hot path, next
to the SOCKS5 and CONNECT parsers that later carry the name; state/ holds config and desired
state and needs none of them (it only normalises and matches the names they return).

The parsers live in sniff_tls.py, sniff_http.py and sniff_quic.py (flat modules, like the rest
of relay/: the package maps one folder), their shared answers in sniff_base.py. Each raises only
its own error (TlsError, HttpError, QuicError, all SniffError) on bytes that claim its protocol
but break it; sniff_stream(), sniff_datagrams() and the two classes below turn those into
NO_NAME, so the relay has nothing to catch: a broken ClientHello goes on to the server as it
would without tproxyd, and fails there.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from . import sniff_http as http
from . import sniff_quic as quic
from . import sniff_tls as tls
from .sniff_base import MAX_SNIFF, NEED_MORE, NO_NAME, Result, Sniff, SniffError

__all__ = ["MAX_SNIFF", "NEED_MORE", "NO_NAME", "DatagramSniff", "Result", "Sniff", "SniffError",
           "StreamSniff", "sniff_datagrams", "sniff_stream"]


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
    """A UDP client's first datagrams: QUIC version 1 Initial packets (see sniff_quic.py); NO_NAME
    for anything else, and when python3-cryptography is missing (quic.AVAILABLE). Never raises."""
    try:
        return quic.sniff_quic(datagrams)
    except SniffError:
        return NO_NAME


class StreamSniff:
    """The sniff of one TCP connection, for a state between accept and connect that the relay
    enters only when RouteTable.wants_name() says so. feed() each recv()'s bytes; `data` keeps
    every byte, to be sent on unchanged to whatever the route connects to. The answer settles
    on a name or NO_NAME (then feed() is not called again); NEED_MORE until then. At
    `deadline` (accept time + relay.sniff_timeout) or the client's EOF, give_up() settles it.

    The parsers read from the start each time, so a client trickling bytes one at a time would
    cost a parse per byte: quadratic, up to a second of the loop's CPU at 16 KiB. feed() parses
    only when the first message may be complete (TLS: its records' lengths, walked once each;
    HTTP: a blank line arrived), the bytes doubled since the last parse, or the bound is
    reached: linear in all. Real clients send their first message in one go, so no name waits.
    """

    __slots__ = ("_head", "_hs", "_parsed", "_pos", "data", "deadline", "result")

    def __init__(self, deadline: float) -> None:
        self.data = bytearray()
        self.deadline = deadline
        self.result: Result = NEED_MORE
        self._parsed = 0  # len(data) at the last parse
        self._pos = 0  # TLS: where the next record header starts
        self._hs = 0  # TLS: handshake bytes in the complete records so far
        self._head = b""  # TLS: the first handshake message's 4-byte header, once read

    def feed(self, chunk: bytes) -> Result:
        before = len(self.data)
        self.data += chunk
        if not self.data:
            return self.result
        size = len(self.data)
        if self._parsed and size < 2 * self._parsed and size < MAX_SNIFF \
                and not self._may_be_complete(before):
            return self.result
        self._parsed = size
        self.result = sniff_stream(bytes(self.data) if before else chunk)  # first: no copy
        return self.result

    def seed(self, chunk: bytes) -> None:
        """Start with bytes the caller already parsed to NEED_MORE: the next feed() does not
        parse them again unless more came."""
        self.data += chunk
        self._parsed = len(self.data)

    def _may_be_complete(self, before: int) -> bool:
        data = self.data
        if data[0] != tls.HANDSHAKE:
            start = max(0, before - 3)
            return data.find(b"\n\n", start) >= 0 or data.find(b"\n\r\n", start) >= 0
        while len(data) - self._pos >= 5:
            if data[self._pos] != tls.HANDSHAKE:
                return True  # not a handshake record: let the parser say what it is
            length = int.from_bytes(data[self._pos + 3:self._pos + 5], "big")
            if self._pos + 5 + length > len(data):
                break
            if len(self._head) < 4:
                self._head += bytes(data[self._pos + 5:self._pos + 5 + min(length, 4 - len(self._head))])
            self._hs += length
            self._pos += 5 + length
            if length == 0:
                return True  # invalid: the parser refuses it
        return len(self._head) == 4 and self._hs >= 4 + int.from_bytes(self._head[1:4], "big")

    def give_up(self) -> Result:
        if self.result is NEED_MORE:
            self._parsed = len(self.data)
            self.result = sniff_stream(bytes(self.data)) if self.data else NO_NAME
            if self.result is NEED_MORE:
                self.result = NO_NAME
        return self.result

    @property
    def name(self) -> str | None:
        return self.result if isinstance(self.result, str) else None


class DatagramSniff:
    """StreamSniff for a UDP session's first datagrams (QUIC): add() each one; all of them are
    forwarded unchanged, in order, once the route is chosen. Each datagram is decrypted once
    (its CRYPTO frames kept); a QUIC client's datagrams with Initials are at least 1200 bytes,
    so at most 13 fit the MAX_SNIFF bound, past which the answer is NO_NAME."""

    __slots__ = ("_frames", "datagrams", "deadline", "result", "size")

    def __init__(self, deadline: float) -> None:
        self.datagrams: List[bytes] = []
        self.deadline = deadline
        self.result: Result = NEED_MORE
        self.size = 0
        self._frames: List[Tuple[int, bytes]] = []

    def add(self, datagram: bytes) -> Result:
        self.datagrams.append(datagram)
        self.size += len(datagram)
        if not quic.AVAILABLE:
            self.result = NO_NAME
            return self.result
        try:
            self._frames += quic.initial_frames(bytes(datagram))
            self.result = quic.name_from_frames(self._frames)
        except SniffError:
            self.result = NO_NAME
        if self.result is NEED_MORE and self.size >= MAX_SNIFF:
            self.result = NO_NAME
        return self.result

    def give_up(self) -> Result:
        if self.result is NEED_MORE:
            self.result = NO_NAME
        return self.result

    @property
    def name(self) -> str | None:
        return self.result if isinstance(self.result, str) else None
