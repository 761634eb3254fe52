"""Which [[route]] a connection takes: the first, in file order, whose keys all match.

(Not to be confused with routing.py, the kernel's ip rules and routes.)

Built once per config, asked at every accept, so a lookup must not grow with the number of
CIDRs: bit i of a mask stands for route i. Each key becomes a map from value to the mask of
routes it admits: per IP family, the sorted starts of the elementary intervals that all
routes' CIDRs cut the address space into, each with the mask of routes covering it (one
bisect); ports the same way over 1..65535; protocols a dict. A route without a key has its bit
everywhere in that key's map. The answer is the lowest bit of the four masks ANDed together.
100,000 CIDRs cost a bisect over about 200,000 starts: see bench/routes.py for the figure.

`domains` (issue 13) is the one key not known at accept: the name comes from the client's first
bytes. candidates() leaves it out; wants_name() says whether waiting for a name could change the
answer; choose() finishes with the name's mask from a DomainTable (a dict walk over the name's
suffixes), or without a name, when only routes without `domains` can match.
"""

from __future__ import annotations

import socket
from bisect import bisect_right
from typing import Dict, Iterable, List, Sequence, Tuple

from .domains import DomainTable
from .intervals import merge
from .upstreams import RouteRule

TOP = {4: (1 << 32) - 1, 6: (1 << 128) - 1}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

Boundaries = Tuple[List[int], List[int]]  # starts (first is 0), mask of each elementary interval


def boundaries(members: Iterable[Tuple[int, Iterable[Tuple[int, int]]]], top: int,
               everywhere: int = 0) -> Boundaries:
    """Elementary intervals over 0..top: members is (bit, inclusive ranges) per route; every
    interval's mask also carries `everywhere` (routes without this key)."""
    events: Dict[int, int] = {}  # point -> bits that toggle there
    for bit, ranges in members:
        for lo, hi in merge(ranges):  # merged: one route's ranges neither overlap nor touch
            events[lo] = events.get(lo, 0) ^ bit
            if hi < top:
                events[hi + 1] = events.get(hi + 1, 0) ^ bit
    starts, masks = [0], [everywhere]
    mask = everywhere
    for point in sorted(events):
        mask ^= events[point]
        if point == 0:
            masks[0] = mask
        elif mask != masks[-1]:
            starts.append(point)
            masks.append(mask)
    return starts, masks


class RouteTable:
    """The routes of one config, compiled. match() and match_text() are what the relay calls."""

    def __init__(self, routes: Sequence[RouteRule]):
        self.routes = tuple(routes)
        everything = (1 << len(self.routes)) - 1
        any_dst = any_src = any_port = 0
        dst: Dict[int, List[Tuple[int, List[Tuple[int, int]]]]] = {4: [], 6: []}
        src: Dict[int, List[Tuple[int, List[Tuple[int, int]]]]] = {4: [], 6: []}
        ports: List[Tuple[int, Tuple[Tuple[int, int], ...]]] = []
        self._proto: Dict[str, int] = {"tcp": 0, "udp": 0}
        named: List[Tuple[int, Tuple[str, ...]]] = []
        for i, route in enumerate(self.routes):
            bit = 1 << i
            if route.destinations is None:
                any_dst |= bit
            else:
                for version in (4, 6):
                    dst[version].append((bit, [(c.address, c.last) for c in route.destinations
                                               if c.version == version]))
            if route.sources is None:
                any_src |= bit
            else:
                for version in (4, 6):
                    src[version].append((bit, [(c.address, c.last) for c in route.sources
                                               if c.version == version]))
            if route.ports is None:
                any_port |= bit
            else:
                ports.append((bit, route.ports))
            for proto in route.protocols:
                self._proto[proto] |= bit
            if route.domains is not None:
                named.append((bit, route.domains))
        self._dst = {v: boundaries(dst[v], TOP[v], any_dst) for v in (4, 6)}
        self._src = {v: boundaries(src[v], TOP[v], any_src) for v in (4, 6)}
        self._ports = boundaries(ports, 65535, any_port)
        self._any_src = any_src
        self._empty = not everything
        self.domains = DomainTable(named)
        self.named = sum(bit for bit, _ in named)  # routes with `domains`
        self.unnamed = everything & ~self.named  # routes a connection without a name can match

    def candidates(self, version: int, dst: int, port: int, src: int, proto: str) -> int:
        """The mask of every route that matches (bit i: routes[i]). Issue 13's sniffing asks
        this: a connection waits for a name only if a candidate before the first sure match
        has `domains`."""
        if self._empty:
            return 0
        starts, masks = self._dst[version]
        mask = masks[bisect_right(starts, dst) - 1] & self._proto[proto]
        if not mask:
            return 0
        starts, masks = self._ports
        mask &= masks[bisect_right(starts, port) - 1]
        if not mask:
            return 0
        starts, masks = self._src[version]
        return mask & masks[bisect_right(starts, src) - 1]

    def wants_name(self, mask: int) -> bool:
        """Whether a connection whose candidates() are `mask` should wait for its name: some
        route with `domains` comes before the first candidate that matches without one. False
        for every connection when no route has `domains` (one AND): sniffing costs nothing."""
        named = mask & self.named
        if not named:
            return False
        sure = mask & self.unnamed
        return not sure or (named & -named) < (sure & -sure)

    def choose(self, mask: int, name: str | None = None) -> RouteRule | None:
        """The first route among candidates() `mask` that the sniffed name also matches (name
        as domains.sniffed() returns it; None: no name, so no `domains` route), or None: direct."""
        if mask & self.named:
            mask &= self.unnamed | (self.domains.mask(name) if name else 0)
        return self.routes[(mask & -mask).bit_length() - 1] if mask else None

    def match(self, version: int, dst: int, port: int, src: int, proto: str,
              name: str | None = None) -> RouteRule | None:
        """The first route matching a connection to dst:port from src (addresses as ints of IP
        version 4 or 6, proto "tcp" or "udp"), with the sniffed name if any, or None: the
        connection goes direct."""
        return self.choose(self.candidates(version, dst, port, src, proto), name)

    def candidates_text(self, dst: str, port: int, src: str, proto: str) -> int:
        """candidates() for addresses as the socket module gives them (see match_text())."""
        if self._empty:
            return 0
        version, d = _parse(dst)
        starts, masks = self._dst[version]
        mask = masks[bisect_right(starts, d) - 1] & self._proto[proto]
        if not mask:
            return 0
        starts, masks = self._ports
        mask &= masks[bisect_right(starts, port) - 1]
        if not mask:
            return 0
        version_s, s = _parse(src)
        if version_s != version:  # cannot happen on one socket; only routes without sources
            return mask & self._any_src
        starts, masks = self._src[version]
        return mask & masks[bisect_right(starts, s) - 1]

    def match_text(self, dst: str, port: int, src: str, proto: str,
                   name: str | None = None) -> RouteRule | None:
        """match() for addresses as the socket module gives them ('198.18.2.2', '2001:db8::2';
        an IPv4-mapped IPv6 address counts as IPv4). A zone (%eth0) is ignored. The source is
        read only when some route still matches the rest (most connections stop before)."""
        mask = self.candidates_text(dst, port, src, proto)
        return self.choose(mask, name) if mask else None

    def __len__(self) -> int:
        return len(self.routes)

    @property
    def interval_count(self) -> int:
        """Elementary destination intervals, both families: what a lookup bisects."""
        return len(self._dst[4][0]) + len(self._dst[6][0])


def _parse(text: str) -> Tuple[int, int]:
    if ":" not in text:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
    if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d from a dual-stack socket
        return 4, value & 0xFFFFFFFF
    return 6, value
