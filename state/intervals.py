"""Canonical contents of nft interval sets: sorted, merged, inclusive integer ranges.

Desired CIDR lists and the kernel's listing (prefixes, ranges, single values, merged or not)
both reduce to this form, so "same contents" is plain tuple equality.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from typing import Any, Iterable, List, Tuple

Range = Tuple[int, int]
Intervals = Tuple[Range, ...]

ADDR_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}


def merge(ranges: Iterable[Range]) -> Intervals:
    """Sort and merge overlapping or adjacent ranges."""
    merged: List[List[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def from_networks(networks: Iterable[Any]) -> Intervals:
    """Canonical ranges covering Cidr blocks."""
    return merge((n.address, n.last) for n in networks)


def digest(intervals: Intervals) -> str:
    """A short stand-in for a set's contents (the generation record keeps these)."""
    return hashlib.sha256(repr(intervals).encode()).hexdigest()


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """Ranges of a not covered by b (both canonical)."""
    result: List[Range] = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] < cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > cur:
                result.append((cur, b[k][0] - 1))
            cur = max(cur, b[k][1] + 1)
            k += 1
        if cur <= hi:
            result.append((cur, hi))
    return tuple(result)


def _addr(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def to_elements(set_type: str, intervals: Intervals) -> List[Any]:
    """nft JSON elements for canonical ranges: one element per range (a prefix when the range
    is exactly one, else a range), so that nft lays the set out as to_kernel() does. (A range
    given as several prefixes would become several adjacent intervals in the kernel, and
    deleting the range's two boundaries later would leave the inner ones behind.)
    """
    elements: List[Any] = []
    version = ADDR_TYPES.get(set_type)
    if version is None:
        for lo, hi in intervals:
            elements.append(lo if lo == hi else {"range": [lo, hi]})
        return elements
    bits = _BITS[version]
    for lo, hi in intervals:
        size = hi - lo + 1
        host = size.bit_length() - 1
        if size & (size - 1) == 0 and lo & (size - 1) == 0:  # exactly one prefix
            if host == 0:
                elements.append(_addr(version, lo))
            else:
                elements.append({"prefix": {"addr": _addr(version, lo), "len": bits - host}})
        else:
            elements.append({"range": [_addr(version, lo), _addr(version, hi)]})
    return elements


class ElementError(ValueError):
    """An element in the kernel's listing that this model cannot read."""


_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_BITS = {4: 32, 6: 128}


def _addr_int(version: int, text: str) -> int:
    """inet_pton, not ipaddress: 100,000 elements read back in a fraction of the time."""
    try:
        return int.from_bytes(socket.inet_pton(_FAMILY[version], text), "big")
    except (OSError, TypeError) as exc:
        raise ElementError(f"expected an IPv{version} address, got {text!r}") from exc


def _value(set_type: str, value: Any) -> int:
    version = ADDR_TYPES.get(set_type)
    if version is not None:
        return _addr_int(version, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ElementError(f"expected an integer, got {value!r}")
    return value


def from_elements(set_type: str, elements: Iterable[Any]) -> Intervals:
    """Canonical ranges from the elements of an nft JSON listing."""
    ranges: List[Range] = []
    for element in elements:
        if isinstance(element, dict) and "elem" in element:
            element = element["elem"]["val"]
        if isinstance(element, dict) and "prefix" in element:
            version = ADDR_TYPES.get(set_type)
            length = element["prefix"]["len"]
            if version is None or not isinstance(length, int) or not 0 <= length <= _BITS[version]:
                raise ElementError(f"unexpected prefix {element!r} in a {set_type} set")
            host = _BITS[version] - length
            lo = _addr_int(version, element["prefix"]["addr"]) >> host << host
            ranges.append((lo, lo | ((1 << host) - 1)))
        elif isinstance(element, dict) and "range" in element:
            lo, hi = element["range"]
            ranges.append((_value(set_type, lo), _value(set_type, hi)))
        else:
            v = _value(set_type, element)
            ranges.append((v, v))
    return merge(ranges)


def describe(set_type: str, intervals: Intervals, limit: int = 4) -> str:
    """A short human form: '198.18.0.0/15, 2001:db8::/32' or '443, 8000-8999', truncated."""
    version = ADDR_TYPES.get(set_type)
    parts: List[str] = []
    for lo, hi in intervals[:limit]:
        if version is None:
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
        else:
            nets = list(ipaddress.summarize_address_range(
                ipaddress.ip_address(_addr(version, lo)), ipaddress.ip_address(_addr(version, hi))))
            parts.append(str(nets[0]) if len(nets) == 1 else f"{_addr(version, lo)}-{_addr(version, hi)}")
    if len(intervals) > limit:
        parts.append(f"... ({len(intervals)} ranges)")
    return ", ".join(parts)


# --- the kernel's form of an interval set --------------------------------------------------------
# An nft interval set (rbtree) holds boundary elements: a start element at each range's first
# value and an end element (flag INTERVAL_END) one past its last. A range that runs to the top
# of the key space has no end element (nft marks its start "open" in userdata for printing), and
# nft puts an end element at 0 when the first range starts above 0. We write what nft writes,
# so `nft list` shows the same set whichever tool loaded it.

KEY_BYTES = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_service": 2}

Element = Tuple[int, bool, bool]  # key, is an end element, is the start of an open range


def key_bytes(set_type: str) -> int:
    try:
        return KEY_BYTES[set_type]
    except KeyError:
        raise ElementError(f"sets of type {set_type} are not supported") from None


def range_elements(lo: int, hi: int, top: int) -> List[Element]:
    """The boundary elements of one range in a set whose largest key is top."""
    if hi >= top:
        return [(lo, False, True)]
    return [(lo, False, False), (hi + 1, True, False)]


def zero_end(intervals: Intervals) -> bool:
    return bool(intervals) and intervals[0][0] > 0


def to_kernel(set_type: str, intervals: Intervals) -> List[Element]:
    """Every element of a set holding exactly these (canonical) ranges, as nft loads it."""
    top = (1 << (8 * key_bytes(set_type))) - 1
    elements: List[Element] = [(0, True, False)] if zero_end(intervals) else []
    for lo, hi in intervals:
        elements += range_elements(lo, hi, top)
    return elements


def from_kernel(set_type: str, elements: Iterable[Tuple[int, bool]], interval: bool = True
                ) -> Intervals:
    """Canonical ranges from a set's elements (key, is an end element) in any order."""
    top = (1 << (8 * key_bytes(set_type))) - 1
    if not interval:
        return merge((key, key) for key, _ in elements)
    ranges: List[Range] = []
    start: int | None = None
    # at one key an end element (closing the range before) sorts before a start element
    for key, end in sorted(elements, key=lambda e: (e[0], not e[1])):
        if end:
            if start is not None and key > start:
                ranges.append((start, key - 1))
            start = None
        elif start is None:
            start = key
    if start is not None:
        ranges.append((start, top))
    return merge(ranges)


def element_changes(set_type: str, old: Intervals, add: Intervals, removed: Intervals
                    ) -> Tuple[List[Element], List[Element]]:
    """(elements to delete, elements to add) that turn a set holding old, laid out as
    to_kernel() lays it out, into one holding old - removed + add (whole ranges, as
    changed_ranges() gives them), the end element at 0 included."""
    top = (1 << (8 * key_bytes(set_type))) - 1
    delete = [e for lo, hi in removed for e in range_elements(lo, hi, top)]
    added = [e for lo, hi in add for e in range_elements(lo, hi, top)]
    kept = set(old) - set(removed)
    new = merge(tuple(kept) + add)
    had, has = zero_end(old), zero_end(new)
    if had and not has:
        delete.insert(0, (0, True, False))
    elif has and not had:
        added.insert(0, (0, True, False))
    return delete, added


def changed_ranges(old: Intervals, new: Intervals) -> Tuple[Intervals, Intervals]:
    """(ranges to add, ranges to delete) turning the set holding old into one holding new.

    Whole ranges: a range that grew is deleted and added again, so the kernel never holds two
    adjacent ranges (or a start without its end) that nft would not have made.
    """
    old_set, new_set = set(old), set(new)
    return (tuple(r for r in new if r not in old_set), tuple(r for r in old if r not in new_set))
