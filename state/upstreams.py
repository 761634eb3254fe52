"""Upstream proxies and the routes that send traffic through them ([[upstream]], [[route]]).

Values here are already checked by the loader. The one piece of I/O behind them (reading a
password file) happens in the loader; this module holds the values and the pure loop check.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable, List, Tuple

from .config import Cidr, Intercept, PortRange

SOCKS5, HTTP = "socks5", "http"
UPSTREAM_TYPES = (SOCKS5, HTTP)
DIRECT, REJECT = "direct", "reject"
PROTOCOLS = ("tcp", "udp")


class Secret:
    """A password read from a file. Its repr and str show only where it came from, so a Config
    can be logged, printed by `tproxy check` or put in status without leaking it.

    A pickled Secret (the desired-state cache pickles Configs) carries no value: the cache is
    keyed by the TOML's bytes, not the password file's, and secrets belong in one file only.
    reveal() on such a copy raises instead of handing out an empty password.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str | None, source: str = "") -> None:
        self._value = value
        self.source = source  # the file it was read from

    def reveal(self) -> str:
        if self._value is None:
            raise LookupError(f"the secret from {self.source or 'its file'} was not loaded "
                              "(a cached config carries none): load the config from its file")
        return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return f"Secret(file={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # A changed password is a changed config (the daemon reloads on inequality).
        if not isinstance(other, Secret):
            return NotImplemented
        if self._value is None or other._value is None:
            return self._value is other._value and self.source == other.source
        return self.source == other.source and hmac.compare_digest(
            self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self.source)

    def __reduce__(self) -> tuple:
        return (Secret, (None, self.source))


@dataclass(frozen=True)
class Upstream:
    name: str  # [a-z0-9_-]+, unique among upstreams; used by routes, logs, metrics labels
    type: str  # SOCKS5 or HTTP
    host: str  # an IP literal (no brackets) or a DNS name, resolved when used
    port: int
    username: str = ""
    password: Secret | None = None  # set exactly when username is
    udp: bool = False  # socks5 only: UDP through UDP ASSOCIATE
    connect_timeout: float = 5.0  # seconds: TCP connect plus the whole handshake
    check_interval: float = 10.0  # seconds between active checks; 0: passive only
    check_target: str = ""  # http only: "host:port" the active check CONNECTs to
    send_domain: bool = True  # a sniffed name goes to it as SOCKS5 DOMAINNAME / the CONNECT host

    @property
    def address(self) -> str:
        """host:port as written back to a person ([v6]:port)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def target(self, address: str, name: str | None = None) -> str:
        """The host to ask this upstream to connect to: the sniffed name when there is one and
        send_domain is on (SOCKS5 DOMAINNAME, `CONNECT name:port`: the upstream resolves it, as
        the client's own DNS answer may be wrong from where the upstream stands), else the
        original destination address."""
        return name if name and self.send_domain else address

    def ip(self) -> Tuple[int, int] | None:
        """(version, address as int) when host is an IP literal; None for a DNS name."""
        return ip_literal(self.host)


@dataclass(frozen=True)
class RouteRule:
    """One [[route]]. A key that was not given is None and matches everything; values within
    a key OR, keys AND. `domains` is one more such key, matched on the name the relay sniffs
    from the client's first bytes; a connection without a name never matches it."""

    name: str
    via: Tuple[str, ...]  # upstream names in failover order, or (DIRECT,) or (REJECT,)
    destinations: Tuple[Cidr, ...] | None = None
    ports: Tuple[PortRange, ...] | None = None  # destination ports
    sources: Tuple[Cidr, ...] | None = None  # client addresses
    protocols: Tuple[str, ...] = PROTOCOLS
    # normalised names (domains.entry): "name" matches it and every name under it, "=name" it alone
    domains: Tuple[str, ...] | None = None

    @property
    def action(self) -> str:
        """DIRECT, REJECT, or "upstream" (try self.via in order)."""
        return self.via[0] if self.via[0] in (DIRECT, REJECT) else "upstream"

    def __reduce__(self) -> tuple:
        # 100,000 Cidr tuples unpickle in half the time as three flat lists (desired_cache)
        return (_route_rule, (self.name, self.via, _flat(self.destinations), self.ports,
                              _flat(self.sources), self.protocols, self.domains))


def _flat(cidrs: Tuple[Cidr, ...] | None) -> tuple | None:
    if cidrs is None:
        return None
    return ([c.version for c in cidrs], [c.address for c in cidrs], [c.prefixlen for c in cidrs])


def _unflat(flat: tuple | None) -> Tuple[Cidr, ...] | None:
    return None if flat is None else tuple(map(Cidr._make, zip(*flat)))


def _route_rule(name: str, via: tuple, dests: tuple | None, ports: tuple | None,
                sources: tuple | None, protocols: tuple, domains: tuple | None = None) -> RouteRule:
    return RouteRule(name, via, _unflat(dests), ports, _unflat(sources), protocols, domains)


def ip_literal(host: str) -> Tuple[int, int] | None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return addr.version, int(addr)


def _covers(cidrs: Iterable[Cidr], version: int, address: int) -> bool:
    return any(c.version == version and c.address <= address <= c.last for c in cidrs)


def _port_in(ports: Tuple[PortRange, ...], port: int) -> bool:
    return not ports or any(lo <= port <= hi for lo, hi in ports)


@dataclass(frozen=True)
class UpstreamPath:
    """How the gateway reaches one address of an upstream, as the host reports it
    (the reconciler resolves names and asks the kernel's route lookup)."""

    upstream: str
    address: str  # an IP literal the upstream's host is (or resolves to)
    interface: str  # the interface the kernel routes that address out of


def captured_paths(intercepts: Iterable[Intercept], upstreams: Iterable[Upstream],
                   paths: Iterable[UpstreamPath]) -> List[Tuple[UpstreamPath, Intercept]]:
    """The loop guard: each path to an upstream whose address is a destination captured on the
    very interface it is reached through. The relay mark keeps tproxyd's own connections out
    of capture; this catches an upstream routed through the gateway itself, whose traffic
    (and its clients') would come back in on that interface and be captured again."""
    ports = {u.name: u.port for u in upstreams}
    found: List[Tuple[UpstreamPath, Intercept]] = []
    intercepts = tuple(intercepts)
    for path in paths:
        literal = ip_literal(path.address)
        if literal is None or path.upstream not in ports:
            continue
        version, address = literal
        for entry in intercepts:
            if (path.interface in entry.interfaces and "tcp" in entry.protocols
                    and _covers(entry.destinations, version, address)
                    and not _covers(entry.exclude, version, address)
                    and _port_in(entry.ports, ports[path.upstream])):
                found.append((path, entry))
    return found


def summary(upstreams: Iterable[Upstream], routes: Iterable[RouteRule]) -> List[str]:
    """One line per upstream and route for `tproxy check` (no secret: only the file's path)."""
    lines = []
    for u in upstreams:
        extras = [f"user {u.username} (password from {u.password.source})"] if u.password else []
        extras += ["udp"] if u.udp else []
        extras += [] if u.send_domain else ["sniffed names not sent"]
        extras.append(f"check every {u.check_interval:g} s" if u.check_interval else "passive checks only")
        lines.append(f"upstream {u.name}: {u.type} {u.address}, " + ", ".join(extras))
    for r in routes:
        keys = []
        if r.destinations is not None:
            keys.append(f"to {len(r.destinations)} destinations")
        if r.ports is not None:
            keys.append("ports " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in r.ports))
        if r.sources is not None:
            keys.append(f"from {len(r.sources)} sources")
        if r.domains is not None:
            keys.append(f"named {r.domains[0]}" if len(r.domains) == 1
                        else f"named {len(r.domains)} domains")
        what = " ".join(keys) or "everything"
        lines.append(f"route {r.name}: {'/'.join(r.protocols)} {what} -> {', '.join(r.via)}")
    return lines
