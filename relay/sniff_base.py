"""What every sniffer answers, and the bound they share (see the package's docstring)."""

from __future__ import annotations

import enum
from typing import Union


class Sniff(enum.Enum):
    NEED_MORE = "need more"
    NO_NAME = "no name"


NEED_MORE, NO_NAME = Sniff.NEED_MORE, Sniff.NO_NAME
Result = Union[str, Sniff]
MAX_SNIFF = 16 * 1024  # bytes of a TCP stream, or of reassembled QUIC CRYPTO data


class SniffError(ValueError):
    """Bytes that start like a protocol but are not valid in it; the message says where."""


# Each parser's own error, and TLS's "the bytes end inside a field", live here rather than in
# their parsers' modules: those are compiled (relay/native.py), and a compiled class could not
# derive from SniffError, which sniff_quic.py's error, in source, derives from too.
class TlsError(SniffError):
    pass


class HttpError(SniffError):
    pass


class Short(Exception):
    """The bytes end inside a field: more may come (not an error)."""
