"""Render a Config into the kernel objects tproxyd wants: rules, routes, one nft table, sysctls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Tuple

from .config import REDIRECT, Config, Intercept, Marks
from .intervals import from_networks, merge
from .nft import NftChain, NftRule, NftSet, NftTable
from .routing import Route, Rule

DEFAULT_DST = {4: "0.0.0.0/0", 6: "::/0"}
# IPv6 routes get metric 1024 from the kernel when none is given; state it so live compares equal.
ROUTE_METRIC = {4: 0, 6: 1024}
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
# Every sysctl tproxyd ever writes (preflight reads others and writes none of them).
WRITTEN_SYSCTLS = frozenset(FORWARDING_SYSCTL.values())
NFT_ADDR = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


@dataclass(frozen=True)
class Owner:
    """What tproxyd owns, by name: the ownership test for everything it may delete."""

    protocol: int
    table: int
    priority: int
    nft_table: str


@dataclass(frozen=True)
class DesiredState:
    owner: Owner
    rules: FrozenSet[Rule]
    routes: FrozenSet[Route]
    nft: NftTable | None  # None: no table at all (nothing to intercept)
    sysctls: Mapping[str, str]

    @property
    def idle(self) -> bool:
        """Nothing to intercept: tproxyd wants nothing on the host."""
        return self.nft is None


def owner_of(config: Config) -> Owner:
    r = config.routing
    return Owner(protocol=r.protocol, table=r.table, priority=r.priority,
                 nft_table=config.nftables.table)


# --- nft expression helpers (libnftables JSON) ----------------------------------------------------

def _match(left: Any, right: Any, op: str = "==") -> Dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Dict[str, Any]:
    return {"meta": {"key": key}}


def _one_or_set(values: Tuple[Any, ...]) -> Any:
    return values[0] if len(values) == 1 else {"set": list(values)}


def _set_mark(mark: int) -> Dict[str, Any]:
    # OR our bit in rather than overwrite: other bits of the mark may belong to someone else.
    return {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), mark]}}}


def _socket_rule(comment: str, marks: Marks, *guard: Dict[str, Any], outbound: bool = False
                 ) -> NftRule:
    """Deliver a packet to the relay's socket that owns it, if one does. outbound: only to a
    socket the relay connects out with (they carry the relay mark), not to the sockets that
    answer captured clients from their servers' addresses."""
    own = [_match({"&": [{"socket": {"key": "mark"}}, marks.relay]}, marks.relay)] if outbound else []
    return NftRule.make(comment, [
        *guard,
        _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
        _match({"socket": {"key": "transparent"}}, 1),
        # not the wildcard listener: forwarded traffic that merely shares its port is not
        # ours; only the relay's connected and bound sockets are
        _match({"socket": {"key": "wildcard"}}, 0),
        *own,
        _set_mark(marks.intercept), {"accept": None}])


def _intercept_chains(entry: Intercept, config: Config) -> Tuple[NftChain, NftChain, List[NftSet]]:
    """The entry's capture chain, its when-down chain, and the sets both match against.

    What a tproxy rule did not take (no relay listening) is forwarded unproxied. The when-down
    chain repeats the same matches in the forward hook (reject is not allowed in prerouting)
    and refuses it: TCP with a reset so clients fail fast, UDP dropped. Captured packets never
    get there: they are local.
    """
    sets: List[NftSet] = []
    exclusions: List[NftRule] = []
    capture: List[NftRule] = []
    refuse: List[NftRule] = []
    for version in entry.families():
        proto, addr_type = NFT_ADDR[version]
        excl = [n for n in entry.exclude if n.version == version]
        if excl:
            name = f"{entry.name}_exclude{version}"
            sets.append(NftSet(name=name, type=addr_type, elements=from_networks(excl)))
            exclusions.append(NftRule.make(
                f"{entry.name}: never capture exclude (ipv{version})",
                [_match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{name}"),
                 {"return": None}]))
    ports: List[Dict[str, Any]] = []
    if entry.ports:
        sets.append(NftSet(name=f"{entry.name}_ports", type="inet_service",
                           elements=merge(entry.ports)))
        ports = [_match({"payload": {"protocol": "th", "field": "dport"}}, f"@{entry.name}_ports")]
    for version in entry.families():
        proto, addr_type = NFT_ADDR[version]
        dst = f"{entry.name}_dst{version}"
        sets.append(NftSet(name=dst, type=addr_type, elements=from_networks(
            n for n in entry.destinations if n.version == version)))
        daddr = _match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{dst}")
        if config.relay.mode == REDIRECT:
            action = [{"redirect": {"port": config.relay.port}}]
        else:
            action = [{"tproxy": {"family": proto, "port": config.relay.port}},
                      _set_mark(config.marks.intercept), {"accept": None}]
        capture.append(NftRule.make(
            f"{entry.name}: capture {'/'.join(entry.protocols)} (ipv{version})",
            [daddr, _match(_meta("l4proto"), _one_or_set(entry.protocols)), *ports, *action]))
        for l4 in entry.protocols:
            verdict = {"reject": {"type": "tcp reset"}} if l4 == "tcp" else {"drop": None}
            refuse.append(NftRule.make(f"{entry.name}: relay down, refuse {l4} (ipv{version})",
                                       [daddr, _match(_meta("l4proto"), l4), *ports, verdict]))
    first: List[NftRule] = []
    if config.relay.mode != REDIRECT:
        first.append(_socket_rule(f"{entry.name}: later packets of captured connections",
                                  config.marks))
    # DHCP to 255.255.255.255, mDNS to 224.0.0.251 and the gateway's own services stay local.
    first.append(NftRule.make("traffic to the gateway itself, broadcast and multicast", [
        _match({"fib": {"result": "type", "flags": ["daddr"]}},
               {"set": ["local", "broadcast", "multicast"]}), {"return": None}]))
    return (NftChain(name=f"intercept_{entry.name}", rules=(*first, *exclusions, *capture)),
            NftChain(name=f"when_down_{entry.name}", rules=(*exclusions, *refuse)), sets)


def render_nft(config: Config) -> NftTable:
    """The table. In tproxy mode one mangle-priority chain captures; in redirect mode the capture
    moves to a nat chain (REDIRECT needs one), and the mangle chain keeps only what delivers
    replies to the relay's spoofed sockets.

    Every packet entering the gateway passes the prerouting chain, forwarded traffic that is
    none of ours included, so its order is the cost of the gateway: a packet that conntrack
    says is not ours is let go after a few register compares, and the socket and fib lookups
    run only where an answer can be ours (an intercepted interface; a first packet; a packet
    conntrack does not follow). Before, every packet paid both lookups and three set lookups:
    nftables' share of the core forwarding one stream past the gateway (bench.upstreams' lab,
    microsocks to the server) fell from 3.5% to 1.5% (perf record, 2026-12-03).
    """
    marks = config.marks
    relay_own = NftRule.make("the relay's own packets are never captured", [
        _match({"&": [_meta("mark"), marks.relay]}, marks.relay), {"return": None}])
    ours = _match({"&": [{"ct": {"key": "mark"}}, marks.relay]}, marks.relay)
    mangle: List[NftRule] = [
        relay_own,
        # The output chain marks the conntrack entry of every connection the relay opens. Its
        # replies (to a client's address when spoofing) and the ICMP errors about it are
        # routed toward the client like any forwarded packet: deliver them to the relay.
        NftRule.make("replies to and ICMP errors about the relay's own connections", [
            _match({"ct": {"key": "direction"}}, "reply"), ours,
            _set_mark(marks.intercept), {"accept": None}]),
    ]
    # Where conntrack cannot say: a relay connection seen from its other end (an entry picked
    # up again after a flush or an expiry starts with the server's packet), a first packet,
    # and packets it does not follow. The relay's outbound socket decides. (Its sockets that
    # answer captured clients are reached from intercepted interfaces only: traffic entering
    # elsewhere for a server the relay answers for is not captured, first packet or later.)
    after = [_socket_rule("the relay's connections, the other way", marks, ours,
                          outbound=True),
             _socket_rule("first packets, and packets without conntrack", marks, _match(
                 {"ct": {"key": "state"}}, ["new", "invalid", "untracked"], "in"),
                 outbound=True)]
    tproxy = config.relay.mode != REDIRECT
    chains: List[NftChain] = []
    sets: List[NftSet] = []
    forward: List[NftRule] = []
    jumps: List[NftRule] = []
    reject = tproxy and config.relay.when_down == "reject"
    for entry in config.intercepts:
        chain, down, entry_sets = _intercept_chains(entry, config)
        chains.append(chain)
        sets += entry_sets
        if reject:
            chains.append(down)
            forward.append(NftRule.make(f"{entry.name}: what the relay did not take", [
                _match(_meta("iifname"), _one_or_set(entry.interfaces)),
                {"jump": {"target": down.name}}]))
        jumps.append(NftRule.make(f"{entry.name}: traffic entering {', '.join(entry.interfaces)}", [
            _match(_meta("iifname"), _one_or_set(entry.interfaces)),
            {"jump": {"target": chain.name}}]))
    # tproxy captures in the mangle chain, between the conntrack answer and the lookups;
    # REDIRECT needs a nat chain of its own
    prerouting = [*mangle, *jumps, *after] if tproxy else [*mangle, *after]
    output = NftRule.make("remember the relay's own connections in conntrack", [
        _match({"&": [_meta("mark"), marks.relay]}, marks.relay),
        {"mangle": {"key": {"ct": {"key": "mark"}},
                    "value": {"|": [{"ct": {"key": "mark"}}, marks.relay]}}}])
    base = [NftChain(name="prerouting", type="filter", hook="prerouting",
                     prio=config.nftables.priority, policy="accept", rules=tuple(prerouting)),
            NftChain(name="output", type="filter", hook="output", prio=config.nftables.priority,
                     policy="accept", rules=(output,))]
    if forward:
        base.append(NftChain(name="forward", type="filter", hook="forward", prio=0,
                             policy="accept", rules=tuple(forward)))
    if not tproxy:
        base.append(NftChain(name="redirect", type="nat", hook="prerouting", prio=-100,
                             policy="accept", rules=(relay_own, *jumps)))
    return NftTable(name=config.nftables.table, chains=(*base, *chains), sets=tuple(sets))


def render(config: Config) -> DesiredState:
    owner = owner_of(config)
    if not config.intercepts:
        # The shipped config: no rule, route, table or sysctl until an intercept is named (what
        # tproxyd owns from an earlier config is still removed: the ownership test holds).
        return DesiredState(owner=owner, rules=frozenset(), routes=frozenset(), nft=None,
                            sysctls={})
    r, m = config.routing, config.marks
    rules = frozenset(Rule(family=v, priority=r.priority, table=r.table, fwmark=m.intercept,
                           fwmask=m.intercept, protocol=r.protocol) for v in (4, 6))
    routes = frozenset(Route(family=v, table=r.table, dst=DEFAULT_DST[v], type="local", dev="lo",
                             protocol=r.protocol, metric=ROUTE_METRIC[v]) for v in (4, 6))
    sysctls = {FORWARDING_SYSCTL[v]: "1" for v in config.families() if r.forwarding}
    return DesiredState(owner=owner, rules=rules, routes=routes, nft=render_nft(config),
                        sysctls=sysctls)
