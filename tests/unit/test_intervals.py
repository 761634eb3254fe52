"""Canonical interval sets: merge and subtract agree with plain set arithmetic, and the kernel's
element forms (prefix, range, single, merged or not) read back to the same canonical value."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.strategies import net
from tproxyd.state.intervals import (
    changed_ranges,
    describe,
    element_changes,
    from_elements,
    from_kernel,
    from_networks,
    merge,
    subtract,
    to_elements,
    to_kernel,
)

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
    halves = from_networks([net("198.18.0.0/16"), net("198.19.0.0/16")])
    assert halves == from_networks([net("198.18.0.0/15")])
    assert to_elements("ipv4_addr", halves) == [{"prefix": {"addr": "198.18.0.0", "len": 15}}]


def test_describe():
    assert describe("inet_service", ((22, 22), (8000, 8999))) == "22, 8000-8999"
    assert describe("ipv6_addr", from_networks([net("2001:db8::/32")])) == "2001:db8::/32"


# --- the kernel's boundary elements ---------------------------------------------------------------

port_sets = st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 2000)), max_size=10).map(
    lambda rs: merge((lo, min(lo + n, 65535)) for lo, n in rs))


@given(port_sets)
def test_kernel_elements_round_trip_in_any_order(canon):
    elements = to_kernel("inet_service", canon)
    pairs = [(key, end) for key, end, _ in elements]
    assert from_kernel("inet_service", pairs) == canon
    assert from_kernel("inet_service", list(reversed(pairs))) == canon  # the kernel dumps descending


def test_kernel_elements_are_what_nft_loads():
    # as `nft --debug=netlink add element inet t s { 10.0.0.0/29, 255.255.255.0/24 }` shows them
    canon = ((0x0A000000, 0x0A000007), (0xFFFFFF00, 0xFFFFFFFF))
    assert to_kernel("ipv4_addr", canon) == [(0, True, False), (0x0A000000, False, False),
                                             (0x0A000008, True, False), (0xFFFFFF00, False, True)]
    assert to_kernel("ipv4_addr", ((0, 5),)) == [(0, False, False), (6, True, False)]
    assert to_kernel("ipv4_addr", ()) == []


@given(port_sets, port_sets)
def test_changed_ranges_turn_old_into_new(old, new):
    add, removed = changed_ranges(old, new)
    kept = set(old) - set(removed)
    assert set(removed) <= set(old) and not (kept & set(add))
    assert merge(tuple(kept) + add) == new


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**20)), max_size=6))
def test_nft_gets_one_element_per_range(ranges):
    """So that nft lays a set out as to_kernel() does: a range sent as several prefixes would
    sit in the kernel as several adjacent intervals."""
    canon = merge((lo, min(lo + n, 2**32 - 1)) for lo, n in ranges)
    assert len(to_elements("ipv4_addr", canon)) == len(canon)


@given(port_sets, port_sets)
def test_element_changes_turn_the_kernels_old_set_into_the_new_one(old, new):
    """Deleting and adding these elements on the kernel's layout of old leaves exactly the
    layout nft (and our batch) would give new: no boundary left behind, none missing."""
    add, removed = changed_ranges(old, new)
    delete, added = element_changes("inet_service", old, add, removed)
    before = set(to_kernel("inet_service", old))
    assert set(delete) <= before and not (set(added) & (before - set(delete)))
    assert (before - set(delete)) | set(added) == set(to_kernel("inet_service", new))
