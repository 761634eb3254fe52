"""Canonical interval sets: merge and subtract agree with plain set arithmetic, and the kernel's
element forms (prefix, range, single, merged or not) read back to the same canonical value."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tproxyd.state.intervals import describe, from_elements, from_networks, merge, subtract, to_elements

small = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)).map(lambda t: (t[0], t[0] + t[1])),
                 max_size=8)


def points(ranges):
    return {p for lo, hi in ranges for p in range(lo, hi + 1)}


@given(small)
def test_merge_keeps_points_and_is_canonical(ranges):
    merged = merge(ranges)
    assert points(merged) == points(ranges)
    assert all(a[1] + 1 < b[0] for a, b in zip(merged, merged[1:]))  # sorted, disjoint, not adjacent
    assert merge(merged) == merged


@given(small, small)
def test_subtract_is_set_difference(a, b):
    assert points(subtract(merge(a), merge(b))) == points(a) - points(b)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**20)), max_size=6))
def test_ipv4_elements_round_trip(ranges):
    canon = merge((lo, min(lo + n, 2**32 - 1)) for lo, n in ranges)
    assert from_elements("ipv4_addr", to_elements("ipv4_addr", canon)) == canon


@given(small)
def test_port_elements_round_trip(ranges):
    canon = merge((lo + 1, hi + 1) for lo, hi in ranges)
    assert from_elements("inet_service", to_elements("inet_service", canon)) == canon


def test_kernel_forms_read_back():
    listed = ["198.18.1.1", {"prefix": {"addr": "198.18.2.0", "len": 24}},
              {"range": ["198.18.3.0", "198.18.3.9"]}, {"elem": {"val": "198.18.4.4", "comment": "x"}}]
    assert from_elements("ipv4_addr", listed) == (
        (int(ipaddress.ip_address("198.18.1.1")),) * 2,
        (int(ipaddress.ip_address("198.18.2.0")), int(ipaddress.ip_address("198.18.3.9"))),
        (int(ipaddress.ip_address("198.18.4.4")),) * 2)


def test_adjacent_prefixes_equal_their_union():
    halves = from_networks([ipaddress.ip_network("198.18.0.0/16"), ipaddress.ip_network("198.19.0.0/16")])
    assert halves == from_networks([ipaddress.ip_network("198.18.0.0/15")])
    assert to_elements("ipv4_addr", halves) == [{"prefix": {"addr": "198.18.0.0", "len": 15}}]


def test_describe():
    assert describe("inet_service", ((22, 22), (8000, 8999))) == "22, 8000-8999"
    assert describe("ipv6_addr", from_networks([ipaddress.ip_network("2001:db8::/32")])) == "2001:db8::/32"
