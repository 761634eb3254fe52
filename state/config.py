"""The validated configuration: what a person asked for in tproxy.toml, with defaults filled in.

Values here are already checked (see loader.py); everything downstream may trust them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Tuple

if TYPE_CHECKING:  # upstreams.py builds on Cidr and Intercept from here
    from .upstreams import RouteRule, Upstream


class Cidr(NamedTuple):
    """An address block as the config holds it: plain ints, because a config may list 100,000
    of them and ipaddress objects cost 1.6 us each to build (and as much again to unpickle
    from the desired-state cache)."""

    version: int  # 4 or 6
    address: int  # the network address; host bits are zero
    prefixlen: int

    @property
    def max_prefixlen(self) -> int:
        return 32 if self.version == 4 else 128

    @property
    def last(self) -> int:
        return self.address | ((1 << (self.max_prefixlen - self.prefixlen)) - 1)

    @classmethod
    def of(cls, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Cidr:
        return cls(net.version, int(net.network_address), net.prefixlen)

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        kind = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return kind((self.address, self.prefixlen))

    def __str__(self) -> str:
        return str(self.network())


PortRange = Tuple[int, int]  # inclusive; a single port is (p, p)

DEFAULT_CONFIG_PATH = "/etc/tproxyd/tproxy.toml"


TPROXY, REDIRECT = "tproxy", "redirect"


@dataclass(frozen=True)
class RelayConfig:
    port: int = 12345
    mode: str = TPROXY  # tproxy: nft tproxy + getsockname; redirect: nft redirect + SO_ORIGINAL_DST
    spoof_source: bool = True  # outbound sockets bind to the client's address (IP_TRANSPARENT)
    max_connections: int = 16384
    connect_timeout: float = 10.0  # seconds
    idle_timeout: float = 3600.0  # seconds without a byte either way; 0: never
    udp_idle_timeout: float = 60.0  # seconds without a datagram either way ends a UDP session
    max_udp_sessions: int = 16384  # past it, the least recently used session is evicted
    workers: int = 1  # single-threaded relay processes sharing the listeners; 0: one per CPU
    drain_timeout: float = 30.0  # on reload, old workers finish their connections this long
    when_down: str = "reject"  # no relay listening: "reject" captured traffic, or "pass" it
    max_pipe_memory: int = 256 << 20  # bytes of splice pipes a relay holds at once, all flows
    max_connections_per_client: int = 1024  # per client address and worker; past it: reset
    max_udp_sessions_per_client: int = 1024  # likewise; past it new sessions' datagrams drop
    sniff_timeout: float = 0.3  # seconds to wait for a client's first bytes when a route needs a name


@dataclass(frozen=True)
class Marks:
    intercept: int = 0x1
    relay: int = 0x2


@dataclass(frozen=True)
class Routing:
    table: int = 100
    priority: int = 10000
    protocol: int = 201  # rtnetlink protocol tag on our rules and routes: the ownership test
    forwarding: bool = True  # set IPv4 (and, when IPv6 is intercepted, IPv6) forwarding on


@dataclass(frozen=True)
class Nftables:
    table: str = "tproxyd"
    priority: int = -150  # "mangle": before conntrack's and NAT's prerouting hooks


@dataclass(frozen=True)
class Daemon:
    state_dir: str = "/run/tproxyd"  # sysctl values to restore on `down`; /run: gone on reboot, as they are
    socket: str = ""  # the daemon's status socket; "" means STATE_DIR/tproxyd.sock
    resync_interval: float = 30.0  # full drift check even without a notification
    on_exit: str = "remove"  # on SIGTERM: "remove" everything, or "keep" the rules in force
    settle: float = 0.2  # a changed file is taken once two reads this far apart agree

    @property
    def socket_path(self) -> str:
        return self.socket or f"{self.state_dir.rstrip('/')}/tproxyd.sock"


@dataclass(frozen=True)
class Metrics:
    """[metrics]: the daemon's Prometheus endpoint. Off when listen is not given."""

    host: str = ""  # an IP literal, without brackets
    port: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @property
    def listen(self) -> str:
        """host:port as written ([v6]:port)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Log:
    """[log]: access = "off", "stderr" or an absolute path (one JSON line per ended connection)."""

    access: str = "off"


@dataclass(frozen=True)
class Intercept:
    name: str
    interfaces: Tuple[str, ...]
    protocols: Tuple[str, ...] = ("tcp", "udp")
    destinations: Tuple[Cidr, ...] = (Cidr(4, 0, 0), Cidr(6, 0, 0))
    ports: Tuple[PortRange, ...] = ()  # empty: every port
    exclude: Tuple[Cidr, ...] = ()

    def families(self) -> Tuple[int, ...]:
        """IP versions this entry captures (4, 6), from its destinations."""
        return tuple(sorted({n.version for n in self.destinations}))


@dataclass(frozen=True)
class Config:
    relay: RelayConfig = field(default_factory=RelayConfig)
    marks: Marks = field(default_factory=Marks)
    routing: Routing = field(default_factory=Routing)
    nftables: Nftables = field(default_factory=Nftables)
    daemon: Daemon = field(default_factory=Daemon)
    metrics: Metrics = field(default_factory=Metrics)
    log: Log = field(default_factory=Log)
    intercepts: Tuple[Intercept, ...] = ()
    upstreams: Tuple[Upstream, ...] = ()  # [[upstream]], by name in routes' `via`
    routes: Tuple[RouteRule, ...] = ()  # [[route]] in file order: the first match decides
    source: str = "<config>"

    def upstream(self, name: str) -> Upstream:
        """The [[upstream]] called name (KeyError if none is)."""
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def relays_udp(self) -> bool:
        """Whether the relay serves UDP: TPROXY mode and an intercept that captures it."""
        return self.relay.mode == TPROXY and any("udp" in i.protocols for i in self.intercepts)

    def families(self) -> Tuple[int, ...]:
        """IP versions captured by any intercept entry."""
        return tuple(sorted({v for i in self.intercepts for v in i.families()}))
