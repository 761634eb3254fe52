"""HTTP/1.x: the host a request is for (RFC 9112 3.2): the authority of an absolute-form
request target (`GET http://example.com/ HTTP/1.1`, which overrides Host), else the Host header.
A port is dropped; an IP literal (`[2001:db8::1]:8080`, `198.51.100.7`) is no name: the
destination address already says it. Anything that is not an HTTP/1.x request line: NO_NAME.
"""

from __future__ import annotations

import re

from tproxyd.state.domains import sniffed

from .sniff_base import MAX_SNIFF, NEED_MORE, NO_NAME, HttpError, Result

_METHOD = re.compile(rb"[A-Z][A-Z_-]{0,23}")  # GET, POST, PROPFIND, M-SEARCH ...; not a token in full
_REQUEST = re.compile(rb"([A-Z][A-Z_-]{0,23}) ([!-~]+) HTTP/1\.[01]\r?")
_ABSOLUTE = re.compile(rb"(?i:[a-z][a-z0-9+.-]*)://(?:[^/?#@]*@)?([^/?#]*)")
_PORT = re.compile(r":\d{0,5}")


def sniff_http(data: bytes) -> Result:
    if not data:
        return NEED_MORE
    line_end = data.find(b"\n")
    if line_end < 0:
        # still inside the request line: give up as soon as it cannot become one
        if not _METHOD.fullmatch(data.split(b" ", 1)[0]):
            return NO_NAME
        return NO_NAME if len(data) >= MAX_SNIFF else NEED_MORE
    match = _REQUEST.fullmatch(data[:line_end])
    if match is None:
        return NO_NAME  # HTTP/2's preface, HTTP/0.9, a binary protocol that starts with a capital
    absolute = _ABSOLUTE.match(match.group(2))
    if absolute is not None:
        return host_name(absolute.group(1))
    pos = line_end + 1
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return NO_NAME if len(data) >= MAX_SNIFF else NEED_MORE
        line = data[pos:end].rstrip(b"\r")
        if not line:
            return NO_NAME  # the header ended without Host (HTTP/1.0)
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in b" \t":
            # RFC 9112 5.1/5.2: no space before the colon, no folded lines: a server answers 400
            raise HttpError(f"header line {line[:40]!r}")
        if name.lower() == b"host":
            return host_name(value.strip(b" \t"))
        pos = end + 1
        if pos >= MAX_SNIFF:
            return NO_NAME


def host_name(authority: bytes) -> Result:
    """The name in host[:port]; NO_NAME for an IP literal, an empty or invalid host."""
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        return NO_NAME
    if text.startswith("["):
        return NO_NAME  # [IPv6] or [IPvFuture]: an address
    host, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
    if colon and not _PORT.fullmatch(colon + port):
        return NO_NAME
    name = sniffed(host)
    return NO_NAME if name is None else name
