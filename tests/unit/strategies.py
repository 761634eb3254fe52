"""Hypothesis strategies: valid configs and arbitrary live states of the kernel."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from tproxyd.state.config import Cidr, Config, Intercept, Marks, Nftables, RelayConfig, Routing
from tproxyd.state.desired import render
from tproxyd.state.intervals import merge
from tproxyd.state.live import LiveState
from tproxyd.state.nft import NftSet, NftTable
from tproxyd.state.routing import Route, Rule


def net(text: str) -> Cidr:
    """A config's Cidr from its text, as tests write them."""
    return Cidr.of(ipaddress.ip_network(text))


@st.composite
def networks(draw, version=None):
    v = draw(st.sampled_from([4, 6])) if version is None else version
    bits = 32 if v == 4 else 128
    prefix = draw(st.integers(min_value=0, max_value=bits))
    # Cluster addresses so that overlaps, adjacency and containment actually happen.
    base = draw(st.integers(min_value=0, max_value=255)) << (bits - 8)
    offset = draw(st.integers(min_value=0, max_value=(1 << (bits - 8)) - 1))
    addr = (base | offset) >> (bits - prefix) << (bits - prefix) if prefix else 0
    return Cidr(v, addr, prefix)


port_ranges = st.tuples(st.integers(1, 65535), st.integers(0, 300)).map(
    lambda t: (t[0], min(65535, t[0] + t[1])))


@st.composite
def intercepts(draw, name):
    return Intercept(
        name=name,
        interfaces=tuple(draw(st.lists(st.sampled_from(["lan0", "lan1", "wlan0", "br0"]),
                                       min_size=1, max_size=3, unique=True))),
        protocols=tuple(draw(st.lists(st.sampled_from(["tcp", "udp"]), min_size=1, max_size=2,
                                      unique=True))),
        destinations=tuple(draw(st.lists(networks(), min_size=1, max_size=8))),
        ports=tuple(draw(st.lists(port_ranges, max_size=5))),
        exclude=tuple(draw(st.lists(networks(), max_size=4))),
    )


@st.composite
def configs(draw):
    names = draw(st.lists(st.sampled_from(["lan", "guest", "iot", "vpn"]), max_size=3, unique=True))
    return Config(
        relay=RelayConfig(port=draw(st.integers(1, 65535))),
        marks=Marks(intercept=draw(st.sampled_from([1, 0x10, 0x100])),
                    relay=draw(st.sampled_from([2, 0x20]))),
        routing=Routing(table=draw(st.sampled_from([100, 200, 1000])),
                        priority=draw(st.sampled_from([100, 10000])),
                        protocol=draw(st.sampled_from([201, 202])),
                        forwarding=draw(st.booleans())),
        nftables=Nftables(table=draw(st.sampled_from(["tproxyd", "gw"]))),
        intercepts=tuple(draw(intercepts(n)) for n in names),
    )


rules = st.builds(Rule, family=st.sampled_from([4, 6]), priority=st.sampled_from([0, 100, 10000, 500]),
                  table=st.sampled_from([100, 200, 254]), fwmark=st.sampled_from([0, 1, 0x10]),
                  fwmask=st.sampled_from([0, 1, 0x10]), protocol=st.sampled_from([0, 3, 201, 202]),
                  other=st.sampled_from(["", "iif eth0"]))
routes = st.builds(Route, family=st.sampled_from([4, 6]), table=st.sampled_from([100, 200, 1000]),
                   dst=st.sampled_from(["0.0.0.0/0", "::/0", "198.18.0.0/15"]),
                   type=st.sampled_from(["local", "unicast"]), dev=st.sampled_from(["lo", "eth0"]),
                   protocol=st.sampled_from([3, 201, 202]), metric=st.sampled_from([0, 1024]))


@st.composite
def nft_tables(draw, config):
    """None, our table as another config renders it, or ours with sets or chains damaged."""
    kind = draw(st.sampled_from(["none", "other", "damaged", "elements"]))
    if kind == "none":
        return None
    if kind == "other":
        other = render(draw(configs())).nft
        return None if other is None else NftTable(name=config.nftables.table,
                                                   chains=other.chains, sets=other.sets)
    table = render(config).nft
    if table is None:
        return None
    if kind == "damaged":
        return NftTable(name=table.name, chains=table.chains[: draw(st.integers(0, len(table.chains)))],
                        sets=table.sets)
    sets = []
    for s in table.sets:
        lo = draw(st.integers(0, 2**32 - 1 if s.type != "inet_service" else 65535))
        extra = ((lo, lo + draw(st.integers(0, 1000))),) if draw(st.booleans()) else ()
        keep = s.elements[: draw(st.integers(0, len(s.elements)))]
        top = 2**32 - 1 if s.type == "ipv4_addr" else 65535 if s.type == "inet_service" else 2**128 - 1
        sets.append(NftSet(s.name, s.type, s.flags,
                           merge((a, min(b, top)) for a, b in keep + extra)))
    return NftTable(name=table.name, chains=table.chains, sets=tuple(sets))


@st.composite
def live_states(draw, config):
    by_key = {r.key: r for r in draw(st.lists(routes, max_size=5))}  # the kernel holds one per key
    return LiveState(
        rules=frozenset(draw(st.lists(rules, max_size=6))),
        routes=frozenset(by_key.values()),
        nft=draw(nft_tables(config)),
        sysctls=draw(st.dictionaries(st.sampled_from(["net.ipv4.ip_forward",
                                                      "net.ipv6.conf.all.forwarding"]),
                                     st.sampled_from(["0", "1"]))),
    )
