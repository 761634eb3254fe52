"""SOCKS5 on the wire (RFC 1928, RFC 1929 username/password): pure functions over bytes.

Builders return the bytes to send. Parsers take everything received so far and return None
while more bytes are needed, or a value with `size`, the bytes it used: what follows belongs to
the next step (after the final reply, to the tunnel). On bytes that cannot be SOCKS5 they raise
Socks5Error and nothing else, so the connection's state machine has one thing to catch.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Tuple

VERSION = 5
AUTH_VERSION = 1  # RFC 1929's sub-negotiation

NO_AUTH, USERNAME_PASSWORD, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 0x01, 0x02, 0x03
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04

REPLY_NAMES = {
    0x00: "succeeded",
    0x01: "general failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
# Replies about the destination, not the upstream: the upstream works, another upstream would
# fail the same way, so these neither mark it down nor fail over (state/health.py's DESTINATION).
DESTINATION_REPLIES = frozenset({0x03, 0x04, 0x05, 0x06})


class Socks5Error(Exception):
    """The server spoke something that is not SOCKS5, or said no. `reason` is a short fixed
    word for counters and access logs; str() is the sentence for the log."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _garbage(message: str) -> Socks5Error:
    return Socks5Error("protocol", message)


def _version(data: bytes, expected: Tuple[int, ...], what: str) -> None:
    if data[0] not in expected:
        hint = " (an HTTP server?)" if data[:4] == b"HTTP" else ""
        raise _garbage(f"{what}: version byte {data[0]:#04x}, expected "
                       f"{' or '.join(f'{v:#04x}' for v in expected)}{hint}")


# --- greeting and method selection ------------------------------------------------------------------

def greeting(with_password: bool = False) -> bytes:
    """VER NMETHODS METHODS: no authentication, and username/password when we have one."""
    return bytes((VERSION, 2, NO_AUTH, USERNAME_PASSWORD)) if with_password \
        else bytes((VERSION, 1, NO_AUTH))


@dataclass(frozen=True)
class MethodChoice:
    method: int  # NO_AUTH or USERNAME_PASSWORD
    size: int = 2


def parse_method(data: bytes, with_password: bool = False) -> MethodChoice | None:
    """The server's VER METHOD. A method we did not offer, or NO_ACCEPTABLE, is refused."""
    if len(data) < 2:
        if data:
            _version(data, (VERSION,), "method selection")
        return None
    _version(data, (VERSION,), "method selection")
    method = data[1]
    if method == NO_ACCEPTABLE:
        raise Socks5Error("auth_required" if not with_password else "no_method",
                          "the server accepts none of our methods"
                          + ("" if with_password else " (it wants a username and password)"))
    if method != NO_AUTH and not (with_password and method == USERNAME_PASSWORD):
        raise _garbage(f"the server chose method {method:#04x}, which we did not offer")
    return MethodChoice(method)


# --- RFC 1929 ---------------------------------------------------------------------------------------

def auth_request(username: str, password: str) -> bytes:
    """VER ULEN UNAME PLEN PASSWD. The loader keeps both at 1..255 bytes."""
    user, secret = username.encode(), password.encode()
    if not 1 <= len(user) <= 255 or not 1 <= len(secret) <= 255:
        raise ValueError("RFC 1929 carries a username and password of 1 to 255 bytes each")
    return bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret


@dataclass(frozen=True)
class AuthResult:
    size: int = 2


def parse_auth(data: bytes) -> AuthResult | None:
    """VER STATUS; a non-zero status is a refusal (Socks5Error reason "auth_failed")."""
    if len(data) < 2:
        if data:
            _version(data, (AUTH_VERSION, VERSION), "authentication reply")
        return None
    # some servers answer with the SOCKS version instead of the sub-negotiation's
    _version(data, (AUTH_VERSION, VERSION), "authentication reply")
    if data[1] != 0:
        raise Socks5Error("auth_failed", f"the server refused the username and password "
                                         f"(status {data[1]:#04x})")
    return AuthResult()


# --- addresses --------------------------------------------------------------------------------------

def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT: an IPv4 or IPv6 literal as such, anything else as a DOMAINNAME (the
    upstream resolves it; issue 13 sends sniffed names this way)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        atyp = ATYP_IPV4
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
            atyp = ATYP_IPV6
        except OSError:
            name = host.encode("idna") if not host.isascii() else host.encode()
            if not 1 <= len(name) <= 255:
                raise ValueError(f"a domain name of {len(name)} bytes does not fit SOCKS5 "
                                 "(1..255)") from None
            return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    return bytes((atyp,)) + packed + struct.pack("!H", port)


def _address(data: bytes, at: int) -> Tuple[str, int, int] | None:
    """(host, port, end) of the ATYP ADDR PORT at data[at:], None if it is not all there."""
    if len(data) <= at:
        return None
    atyp = data[at]
    if atyp == ATYP_IPV4:
        end = at + 1 + 4 + 2
        if len(data) < end:
            return None
        host = socket.inet_ntop(socket.AF_INET, data[at + 1:at + 5])
    elif atyp == ATYP_IPV6:
        end = at + 1 + 16 + 2
        if len(data) < end:
            return None
        host = socket.inet_ntop(socket.AF_INET6, data[at + 1:at + 17])
    elif atyp == ATYP_DOMAIN:
        if len(data) < at + 2:
            return None
        end = at + 2 + data[at + 1] + 2
        if len(data) < end:
            return None
        host = data[at + 2:end - 2].decode("ascii", "replace")
    else:
        raise _garbage(f"unknown address type {atyp:#04x}")
    return host, struct.unpack_from("!H", data, end - 2)[0], end


# --- requests and replies ---------------------------------------------------------------------------

def request(command: int, host: str, port: int) -> bytes:
    """VER CMD RSV ATYP DST.ADDR DST.PORT."""
    return bytes((VERSION, command, 0)) + encode_address(host, port)


def connect_request(host: str, port: int) -> bytes:
    return request(CONNECT, host, port)


def udp_associate_request(host: str = "0.0.0.0", port: int = 0) -> bytes:
    """host:port is where our datagrams will come from; zeros where the server allows it."""
    return request(UDP_ASSOCIATE, host, port)


@dataclass(frozen=True)
class Reply:
    code: int
    host: str  # BND.ADDR: for UDP ASSOCIATE, where to send datagrams (0.0.0.0 / ::: the server's
    port: int  # own address); for CONNECT, the upstream's address towards the destination
    size: int  # bytes of the reply; data[size:] already belongs to the tunnel

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def name(self) -> str:
        return REPLY_NAMES.get(self.code, f"unknown reply {self.code:#04x}")

    @property
    def about_destination(self) -> bool:
        """The upstream reached out and the destination failed (unreachable, refused, TTL)."""
        return self.code in DESTINATION_REPLIES

    @property
    def unspecified(self) -> bool:
        """BND.ADDR 0.0.0.0 or ::: send to the upstream's own address instead."""
        return self.host in ("0.0.0.0", "::")


def parse_reply(data: bytes) -> Reply | None:
    """VER REP RSV ATYP BND.ADDR BND.PORT. A reply with a failure code is returned, not raised:
    the caller logs reply.name and decides (see Reply.about_destination)."""
    if not data:
        return None
    _version(data, (VERSION,), "reply")
    if len(data) < 4:
        return None
    parsed = _address(data, 3)  # RSV is not checked: servers put junk there and it means nothing
    if parsed is None:
        return None
    host, port, end = parsed
    return Reply(code=data[1], host=host, port=port, size=end)


# --- UDP request header -----------------------------------------------------------------------------

def udp_header(host: str, port: int) -> bytes:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT: prefix of every datagram sent to the relay address."""
    return b"\0\0\0" + encode_address(host, port)


@dataclass(frozen=True)
class UdpDatagram:
    host: str  # where the datagram came from (replies) or goes to (requests)
    port: int
    offset: int  # the payload is data[offset:]


def parse_udp(data: bytes) -> UdpDatagram:
    """A datagram from the relay address. Whole or nothing: a datagram is never continued, so
    a short one is an error, not "need more". Fragments (FRAG != 0) are refused, as RFC 1928
    lets an implementation that does not reassemble do."""
    if len(data) < 4:
        raise _garbage(f"UDP datagram of {len(data)} bytes is shorter than its header")
    if data[2] != 0:
        raise Socks5Error("fragment", f"UDP fragment {data[2]:#04x} dropped (no reassembly)")
    parsed = _address(data, 3)
    if parsed is None:
        raise _garbage("UDP datagram ends inside its header")
    host, port, end = parsed
    return UdpDatagram(host, port, end)
