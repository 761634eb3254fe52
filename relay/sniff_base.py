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
