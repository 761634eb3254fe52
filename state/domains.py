"""Domain names for [[route]] `domains`: normalisation and the matcher the relay asks per name.

Config names are normalised once at load: lowercase, no trailing dot, and non-ASCII names turned
into their A-label (punycode) form by IDNA 2008 with UTS #46 mapping (python3-idna). The stdlib's
`encodings.idna` is IDNA 2003, which maps "faß.de" to "fass.de", a different registered domain
than the "xn--fa-hia.de" every current browser and TLS client sends: matching would miss it.

A sniffed name is already ASCII (SNI and Host carry A-labels), so the per-connection cost is a
lowercase and one dict lookup per label of the name: independent of how many entries there are.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from typing import Any, Dict, Iterable, List, Tuple

try:  # Debian's python3-idna (IDNA 2008); config with non-ASCII names needs it
    import idna as _idna
except ImportError:  # pragma: no cover - exercised only without python3-idna
    _idna = None  # type: ignore[assignment]

EXACT = "="  # prefix of an entry that matches the name only, not the names under it
MAX_NAME = 253
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# a sniffed name's labels: underscores appear in real SNI (service names); allowed here, where
# refusing costs a route (the config's names are held to _LABEL_RE)
_SNIFFED_RE = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")


class DomainError(ValueError):
    """A name that cannot be routed on; the message says why (for the config's key path)."""


def normalise(text: str) -> str:
    """The canonical form of a config name: lowercase A-labels, no trailing dot.
    Raises DomainError with the reason for anything that is not a DNS host name."""
    if not text or text == ".":
        raise DomainError("is empty")
    name = text[:-1] if text.endswith(".") else text
    if "*" in name:
        raise DomainError(f"'{text}': no wildcards; a name already matches every name under it "
                          "(prefix '=' for the name alone)")
    if not name.isascii():
        if _idna is None:
            raise DomainError(f"'{text}' is not ASCII and python3-idna is not installed to convert "
                              "it; write its xn-- form")
        try:
            name = _idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (_idna.IDNAError, UnicodeError) as e:
            raise DomainError(f"'{text}' is not a valid internationalised name ({e})") from None
    name = name.lower()
    if len(name) > MAX_NAME:
        raise DomainError(f"'{text}' is longer than {MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise DomainError(f"'{text}': label '{label}' is not 1-63 letters, digits or inner "
                              "hyphens")
        if label.startswith("xn--") and _idna is not None:
            try:
                _idna.decode(label)
            except (_idna.IDNAError, UnicodeError) as e:
                raise DomainError(f"'{text}': '{label}' is not valid punycode ({e})") from None
    if labels[-1].isdigit():
        raise DomainError(f"'{text}' looks like an IP address, not a name; "
                          "use `destinations` for addresses")
    return name


def entry(text: str) -> str:
    """A config entry: a name, or "=" and a name; returned normalised with its prefix."""
    if text.startswith(EXACT):
        return EXACT + normalise(text[1:])
    return normalise(text)


def sniffed(name: str) -> str | None:
    """A name read from a client (SNI, Host) in the form the matcher keys on, or None when it
    is not a host name (an address literal, garbage): such a connection routes without a name."""
    name = name[:-1].lower() if name.endswith(".") else name.lower()
    # one regular expression, in C: this runs once per sniffed connection
    if len(name) > MAX_NAME or not _SNIFFED_RE.fullmatch(name) or name.rpartition(".")[2].isdigit():
        return None
    return name


class DomainTable:
    """Bit i stands for route i, as in RouteTable. Built from (bit, entries) per domains route;
    mask(name) is the OR of the bits of every route with an entry matching the name."""

    __slots__ = ("_exact", "_suffix", "size")

    def __init__(self, members: Iterable[Tuple[int, Iterable[str]]] = ()):
        self._suffix: Dict[str, int] = {}  # name -> routes matching it and every name under it
        self._exact: Dict[str, int] = {}  # name -> routes matching it alone
        self.size = 0
        for bit, entries in members:
            for item in entries:
                self.size += 1
                if item.startswith(EXACT):
                    self._exact[item[1:]] = self._exact.get(item[1:], 0) | bit
                else:
                    self._suffix[item] = self._suffix.get(item, 0) | bit

    def mask(self, name: str) -> int:
        """name: as sniffed() returns it (lowercase, no trailing dot)."""
        suffix = self._suffix
        mask = self._exact.get(name, 0) | suffix.get(name, 0)
        dot = name.find(".")
        while dot >= 0:  # every parent at a label boundary: "a.b.c" asks "b.c", then "c"
            mask |= suffix.get(name[dot + 1:], 0)
            dot = name.find(".", dot + 1)
        return mask

    def __len__(self) -> int:
        return self.size


def quic_sniffing_available() -> bool:
    """Whether the relay can read names from QUIC: it needs python3-cryptography for AES (asked
    without importing it, or the relay, from here)."""
    return find_spec("cryptography") is not None


def sniff_notes(routes: Iterable[Any], quic: bool | None = None) -> List[str]:
    """What `tproxy check` should say about routing by name for these RouteRules: QUIC (UDP)
    connections a `domains` route could take are routed without a name when AES is missing."""
    quic = quic_sniffing_available() if quic is None else quic
    named_udp = [r.name for r in routes if r.domains is not None and "udp" in r.protocols]
    if named_udp and not quic:
        return [f"route {named_udp[0]}{' and others' if len(named_udp) > 1 else ''}: QUIC (UDP) "
                "connections are routed without a name: python3-cryptography is not installed "
                "(apt install python3-cryptography)"]
    return []
