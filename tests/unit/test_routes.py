"""Route matching: the compiled table agrees with a plain scan of the routes in file order."""

from __future__ import annotations

import ipaddress
from bisect import bisect_right

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.strategies import net, networks, port_ranges
from tproxyd.state.loader import loads
from tproxyd.state.routes import RouteTable, boundaries
from tproxyd.state.upstreams import RouteRule


def naive(routes, version, dst, port, src, proto):
    def covers(cidrs, addr):
        return cidrs is None or any(c.version == version and c.address <= addr <= c.last for c in cidrs)

    for route in routes:
        if (covers(route.destinations, dst) and covers(route.sources, src) and proto in route.protocols
                and (route.ports is None or any(lo <= port <= hi for lo, hi in route.ports))):
            return route
    return None


@st.composite
def route_rules(draw, index):
    def optional(strategy):
        return draw(st.one_of(st.none(), strategy))

    return RouteRule(
        name=f"route{index}", via=("direct",),
        destinations=optional(st.lists(networks(), min_size=1, max_size=6).map(tuple)),
        ports=optional(st.lists(port_ranges, min_size=1, max_size=3).map(tuple)),
        sources=optional(st.lists(networks(), min_size=1, max_size=3).map(tuple)),
        protocols=draw(st.sampled_from([("tcp",), ("udp",), ("tcp", "udp")])))


@st.composite
def tables(draw):
    count = draw(st.integers(0, 8))
    return [draw(route_rules(i)) for i in range(count)]


@st.composite
def addresses(draw, routes, version):
    """Mostly edges of the routes' own CIDRs (where an off-by-one would show), some random."""
    bits = 32 if version == 4 else 128
    edges = [c.address + d for r in routes for cs in (r.destinations or (), r.sources or ())
             for c in cs if c.version == version for d in (-1, 0)]
    edges += [c.last + d for r in routes for cs in (r.destinations or (), r.sources or ())
              for c in cs if c.version == version for d in (0, 1)]
    edges = [e for e in edges if 0 <= e < 1 << bits]
    choices = [st.integers(0, (1 << bits) - 1), st.sampled_from([0, (1 << bits) - 1])]
    if edges:
        choices.append(st.sampled_from(edges))
    return draw(st.one_of(*choices))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fast_matcher_agrees_with_a_linear_scan(data):
    routes = data.draw(tables())
    table = RouteTable(routes)
    for _ in range(12):
        version = data.draw(st.sampled_from([4, 6]))
        dst = data.draw(addresses(routes, version))
        src = data.draw(addresses(routes, version))
        edge_ports = [p for r in routes for lo, hi in r.ports or () for p in (lo - 1, lo, hi, hi + 1)]
        port = data.draw(st.one_of(st.integers(1, 65535), st.sampled_from([1, 65535, *edge_ports])))
        port = min(max(port, 1), 65535)
        proto = data.draw(st.sampled_from(["tcp", "udp"]))
        expected = naive(routes, version, dst, port, src, proto)
        assert table.match(version, dst, port, src, proto) == expected
        if version == 4 or (dst >> 32 != 0xFFFF and src >> 32 != 0xFFFF):  # mapped: IPv4 in text
            assert table.match_text(text(version, dst), port, text(version, src), proto) == expected


def text(version, value):
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(0, 8)), max_size=10),
       st.integers(0, 70))
def test_boundaries_give_each_point_the_mask_of_routes_covering_it(spans, point):
    members = {}
    for bit, lo, n in spans:
        members.setdefault(1 << bit, []).append((lo, min(lo + n, 70)))
    starts, masks = boundaries(members.items(), 70, everywhere=1 << 5)
    expected = 1 << 5
    for bit, ranges in members.items():
        if any(lo <= point <= hi for lo, hi in ranges):
            expected |= bit
    assert masks[bisect_right(starts, point) - 1] == expected
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:]))
    assert all(a != b for a, b in zip(masks, masks[1:]))  # coalesced


def test_first_match_in_file_order_and_text_addresses():
    config = loads(
        '[[upstream]]\nname = "corp"\ntype = "socks5"\naddress = "198.51.100.7:1080"\nudp = true\n'
        '[[route]]\nname = "blocked"\ndestinations = ["198.18.5.0/24"]\nvia = "reject"\n'
        '[[route]]\nname = "corp"\ndestinations = ["198.18.0.0/15", "2001:db8:100::/48"]\n'
        'ports = [443, "8000-8999"]\nsources = ["198.18.1.0/24", "2001:db8:1::/64"]\nvia = "corp"\n'
        '[[route]]\nname = "dns"\nprotocols = ["udp"]\nports = [53]\nvia = "corp"\n')
    table = RouteTable(config.routes)

    def name(dst, port, src, proto="tcp"):
        route = table.match_text(dst, port, src, proto)
        return route.name if route else None

    assert name("198.18.5.1", 443, "198.18.1.2") == "blocked"  # first match wins
    assert name("198.18.2.2", 443, "198.18.1.2") == "corp"
    assert name("198.18.2.2", 8999, "198.18.1.2") == "corp"
    assert name("198.18.2.2", 9000, "198.18.1.2") is None  # port outside: direct
    assert name("198.18.2.2", 443, "198.18.3.2") is None  # source outside
    assert name("198.20.0.1", 443, "198.18.1.2") is None  # destination outside
    assert name("2001:db8:100::5", 443, "2001:db8:1::2") == "corp"
    assert name("2001:db8:100::5", 443, "::ffff:198.18.1.2") is None  # families never mix
    assert name("::ffff:198.18.2.2", 443, "::ffff:198.18.1.2") == "corp"  # mapped counts as IPv4
    assert name("fe80::1%lan0", 53, "fe80::2%lan0", "udp") == "dns"
    assert name("198.18.2.2", 53, "198.18.1.2", "tcp") is None
    assert len(table) == 3


def test_no_routes_match_nothing():
    table = RouteTable(())
    assert table.match(4, 1, 1, 1, "tcp") is None
    assert table.match_text("198.18.0.1", 80, "198.18.0.2", "udp") is None


def test_route_without_keys_matches_everything():
    table = RouteTable([RouteRule(name="all", via=("direct",))])
    assert table.match(6, 0, 1, (1 << 128) - 1, "udp").name == "all"
    assert table.match(4, 2**32 - 1, 65535, 0, "tcp").name == "all"


def test_many_routes_and_cidrs():
    nets = [net(str(ipaddress.IPv4Network((0xC6120000 + (i << 4), 28)))) for i in range(3000)]
    routes = [RouteRule(name=f"r{i}", via=("direct",), destinations=tuple(nets[i::70]))
              for i in range(70)]
    table = RouteTable(routes)
    for i in (0, 1, 69, 70, 2999):
        assert table.match(4, nets[i].address + 3, 80, 0, "tcp").name == f"r{i % 70}"
    assert table.match(4, nets[-1].last + 1, 80, 0, "tcp") is None
