"""HTTP/1.1 CONNECT on the wire: the request, and the proxy's response parsed as it arrives.

parse_response() takes everything received so far and returns None while the header is not
complete, or the Response with `size`: data[size:] is the first of the tunnel's bytes (a proxy
may send them in the same segment). It raises HttpConnectError, and nothing else, on a response
that is not HTTP or whose header passes MAX_HEADER bytes.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Tuple

MAX_HEADER = 16 * 1024  # the bound: a proxy sending more is broken or hostile
STATUS_RE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\Z")
# A CONNECT target is host:port; these bytes would let a sniffed or configured name smuggle
# a header in (CR, LF) or break the request line (space, controls).
_BAD_HOST = re.compile(r"[\x00-\x20\x7f/?#@]")


class HttpConnectError(Exception):
    """The proxy's answer is not an HTTP response we can use. `reason` is a short fixed word
    for counters and access logs; str() is the sentence for the log."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def authority(host: str, port: int) -> str:
    """host:port as a request target: an IPv6 literal in brackets."""
    if not host or _BAD_HOST.search(host) or not 0 < port <= 65535:
        raise ValueError(f"{host!r}:{port} is not a CONNECT target")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_request(host: str, port: int, username: str = "", password: str = "") -> bytes:
    """CONNECT host:port HTTP/1.1 with Host, and Proxy-Authorization: Basic when a username
    is given (RFC 7617: user-id ':' password in UTF-8, base64)."""
    target = authority(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass(frozen=True)
class Response:
    code: int
    status_line: str  # as received, for logs (printable ASCII only, at most 200 characters)
    headers: Tuple[Tuple[str, str], ...]
    size: int  # bytes of the header, the blank line included

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def auth_failed(self) -> bool:
        return self.code == 407

    @property
    def about_destination(self) -> bool:
        """The proxy answered for the destination: bad gateway, unavailable, gateway timeout."""
        return self.code in (502, 503, 504)


def _header_end(data: bytes) -> int:
    """Index just past the blank line ending the header, or -1. A bare LF is accepted as a
    line end, as RFC 9112 2.2 allows a recipient to."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    mixed = data.find(b"\n\r\n")  # LF line, then CRLF blank line
    if mixed >= 0:
        ends.append(mixed + 3)
    return min(ends) if ends else -1


def _printable(raw: bytes) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in raw.decode("latin-1"))[:200]


def parse_response(data: bytes, limit: int = MAX_HEADER) -> Response | None:
    """The response to our CONNECT, once its header is complete (None before)."""
    first_nl = data.find(b"\n")
    first = data if first_nl < 0 else data[:first_nl]
    if first and not b"HTTP/1.".startswith(first[:7]):
        hint = " (a SOCKS5 server?)" if first[:1] == b"\x05" else ""
        raise HttpConnectError("protocol", f"not an HTTP response: {_printable(first[:40])!r}{hint}")
    end = _header_end(data)
    if end < 0:
        if len(data) >= limit:
            raise HttpConnectError("header_too_large", f"response header over {limit} bytes")
        return None
    if end > limit:
        raise HttpConnectError("header_too_large", f"response header over {limit} bytes")
    match = STATUS_RE.match(first)
    if match is None:
        raise HttpConnectError("protocol", f"bad status line: {_printable(first)!r}")
    headers = []
    for raw in data[first_nl + 1:end].split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpConnectError("protocol", f"bad header line: {_printable(line[:80])!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return Response(code=int(match.group(1)), status_line=_printable(first.rstrip(b"\r")),
                    headers=tuple(headers), size=end)
