"""Routes by name: the DomainTable and RouteTable's choose()/wants_name() agree with a plain scan
of the routes in file order, with a plain suffix check per entry."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_routes import addresses, naive, route_rules
from tproxyd.state.domains import DomainTable
from tproxyd.state.loader import loads
from tproxyd.state.routes import RouteTable
from tproxyd.state.upstreams import RouteRule

LABELS = ["a", "b", "ab", "ba", "com", "xn--fa-hia"]  # few, so that names collide and nest
names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)
entries = st.tuples(st.booleans(), names).map(lambda t: ("=" if t[0] else "") + t[1])


def entry_matches(item: str, name: str) -> bool:
    if item.startswith("="):
        return name == item[1:]
    return name == item or name.endswith("." + item)  # label boundary: "hub.com" misses "github.com"


def naive_named(routes, name, *keys):
    """naive() over the routes a name (or no name) admits."""
    admitted = [r for r in routes if r.domains is None
                or (name is not None and any(entry_matches(d, name) for d in r.domains))]
    return naive(admitted, *keys)


@st.composite
def named_tables(draw):
    routes = []
    for i in range(draw(st.integers(0, 8))):
        rule = draw(route_rules(i))
        if draw(st.booleans()):
            rule = dataclasses.replace(rule, domains=tuple(draw(st.lists(entries, min_size=1, max_size=5))))
        routes.append(rule)
    return routes


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_match_with_names_agrees_with_a_linear_scan(data):
    routes = data.draw(named_tables())
    table = RouteTable(routes)
    for _ in range(8):
        version = data.draw(st.sampled_from([4, 6]))
        keys = (version, data.draw(addresses(routes, version)), data.draw(st.integers(1, 65535)),
                data.draw(addresses(routes, version)), data.draw(st.sampled_from(["tcp", "udp"])))
        mask = table.candidates(*keys)
        without = naive_named(routes, None, *keys)
        assert table.match(*keys) == table.choose(mask) == without
        probes = [data.draw(names) for _ in range(4)]
        probes += [d.lstrip("=") for r in routes for d in r.domains or ()]
        changes = False
        for name in probes:
            expected = naive_named(routes, name, *keys)
            assert table.choose(mask, name) == table.match(*keys, name=name) == expected
            changes |= expected != without
        # waiting for a name is asked for exactly when some name would change the route
        assert table.wants_name(mask) == changes


@given(st.lists(st.lists(entries, max_size=6), max_size=6), names)
def test_domain_mask_is_the_or_of_every_matching_entry(members, name):
    table = DomainTable((1 << i, entries_) for i, entries_ in enumerate(members))
    expected = sum(1 << i for i, es in enumerate(members) if any(entry_matches(e, name) for e in es))
    assert table.mask(name) == expected
    assert len(table) == sum(map(len, members))


def test_label_boundaries_and_exact():
    table = DomainTable([(1, ["github.com"]), (2, ["=login.example.com"]), (4, ["com"])])
    assert table.mask("github.com") == 1 | 4
    assert table.mask("api.github.com") == 1 | 4
    assert table.mask("notgithub.com") == 4
    assert table.mask("hub.com") == 4
    assert table.mask("login.example.com") == 2 | 4
    assert table.mask("a.login.example.com") == 4
    assert table.mask("github.org") == 0


def test_sniffing_is_asked_for_only_where_a_named_route_could_come_first():
    config = loads('[[route]]\nname = "web-names"\ndomains = ["github.com"]\nports = [443, 80]\n'
                   'via = "reject"\n'
                   '[[route]]\nname = "lan"\ndestinations = ["10.0.0.0/8"]\nvia = "direct"\n'
                   '[[route]]\nname = "late-names"\ndomains = ["=x.example"]\nvia = "reject"\n')
    table = RouteTable(config.routes)
    assert table.wants_name(table.candidates_text("198.51.100.1", 443, "192.168.1.2", "tcp"))
    assert table.wants_name(table.candidates_text("10.1.1.1", 443, "192.168.1.2", "tcp"))
    assert not table.wants_name(table.candidates_text("10.1.1.1", 22, "192.168.1.2", "tcp"))  # lan first
    assert table.wants_name(table.candidates_text("198.51.100.1", 22, "192.168.1.2", "tcp"))
    mask = table.candidates_text("10.1.1.1", 443, "192.168.1.2", "tcp")
    assert table.choose(mask, "api.github.com").name == "web-names"
    assert table.choose(mask, "gitlab.com").name == "lan"
    assert table.choose(mask).name == "lan"
    assert table.match_text("10.1.1.1", 443, "192.168.1.2", "tcp", "github.com").name == "web-names"
    assert table.match_text("203.0.113.9", 22, "192.168.1.2", "tcp", "x.example").name == "late-names"
    assert table.match_text("203.0.113.9", 22, "192.168.1.2", "tcp", "y.x.example") is None


def test_no_named_routes_never_wait():
    table = RouteTable([RouteRule(name="r", via=("direct",))])
    assert not table.wants_name(table.candidates_text("198.51.100.1", 443, "192.168.1.2", "tcp"))
    assert not RouteTable([]).wants_name(0)
