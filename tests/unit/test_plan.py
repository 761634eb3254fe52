"""The planner against the fake kernel: converge from anything, touch only what is ours,
and a second plan is always empty."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.strategies import net
from tproxyd.state.desired import render
from tproxyd.state.intervals import from_networks
from tproxyd.state.live import LiveState
from tproxyd.state.loader import loads
from tproxyd.state.nft import NftSet
from tproxyd.state.plan import (
    AddRoute,
    AddRule,
    DeleteNftTable,
    DeleteRoute,
    DeleteRule,
    ReplaceNftTable,
    ReplaceRoute,
    SetSysctl,
    UpdateNftSet,
    op_to_json,
    plan,
    plan_down,
)
from tproxyd.state.routing import Route, Rule
from tproxyd.state.simulate import apply_all

from .strategies import configs, live_states

CONFIG = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
               'destinations = ["198.18.0.0/16", "2001:db8::/32"]\nports = [80, "8000-8080"]\n')
DESIRED = render(CONFIG)


def converge(desired, live):
    return apply_all(live, plan(desired, live))


def test_from_nothing_plans_every_object_in_order():
    ops = plan(DESIRED, LiveState())
    kinds = [type(op) for op in ops]
    assert kinds == [SetSysctl, SetSysctl, AddRoute, AddRoute, AddRule, AddRule, ReplaceNftTable]
    texts = [str(op) for op in ops]
    assert "+ rule ipv4 fwmark 0x1/0x1 lookup 100 pref 10000 proto 201" in texts
    assert "+ route ipv6 local ::/0 dev lo table 100 proto 201 metric 1024" in texts
    assert all(op_to_json(op)["text"] == str(op) for op in ops)


def test_second_plan_is_empty():
    live = converge(DESIRED, LiveState())
    assert plan(DESIRED, live) == ()


def test_foreign_rules_and_routes_are_never_touched():
    theirs_rule = Rule(4, 500, 200, fwmark=0x10, fwmask=0x10, protocol=3)
    theirs_same_prio = Rule(4, 10000, 100, fwmark=1, fwmask=1, protocol=4)  # like ours, not ours
    theirs_route = Route(4, 100, "198.18.0.0/15", "unicast", "eth0", protocol=3)
    live = LiveState(rules=frozenset({theirs_rule, theirs_same_prio}),
                     routes=frozenset({theirs_route}))
    after = converge(DESIRED, live)
    assert {theirs_rule, theirs_same_prio} <= after.rules
    assert theirs_route in after.routes
    down = apply_all(after, plan_down(DESIRED.owner, after, {}))
    assert down.rules == {theirs_rule, theirs_same_prio}
    assert down.routes == {theirs_route}
    assert down.nft is None


def test_our_stale_objects_are_removed():
    stale_rule = Rule(4, 9000, 100, fwmark=1, fwmask=1, protocol=201)
    stale_route = Route(4, 100, "198.18.0.0/15", protocol=201)
    live = converge(DESIRED, LiveState())
    live = dataclasses.replace(live, rules=live.rules | {stale_rule},
                               routes=live.routes | {stale_route})
    ops = plan(DESIRED, live)
    assert set(ops) == {DeleteRule(stale_rule), DeleteRoute(stale_route)}


def test_route_changed_by_hand_is_replaced():
    live = converge(DESIRED, LiveState())
    (v4,) = [r for r in live.routes if r.family == 4]
    changed = dataclasses.replace(v4, protocol=4)  # `ip route replace ... proto static`
    live = dataclasses.replace(live, routes=(live.routes - {v4}) | {changed})
    assert plan(DESIRED, live) == (ReplaceRoute(v4, changed),)


def test_changed_sysctl_is_set_again():
    live = converge(DESIRED, LiveState(sysctls={"net.ipv4.ip_forward": "0"}))
    live = dataclasses.replace(live, sysctls={**live.sysctls, "net.ipv4.ip_forward": "0"})
    assert plan(DESIRED, live) == (SetSysctl("net.ipv4.ip_forward", "1", "0"),)


def test_flushed_chains_rebuild_the_table():
    live = converge(DESIRED, LiveState())
    flushed = dataclasses.replace(live.nft, chains=tuple(
        dataclasses.replace(c, rules=()) for c in live.nft.chains))
    ops = plan(DESIRED, dataclasses.replace(live, nft=flushed))
    assert [type(op) for op in ops] == [ReplaceNftTable]


def _with_set(live: LiveState, name: str, elements) -> LiveState:
    sets = tuple(NftSet(s.name, s.type, s.flags, elements) if s.name == name else s
                 for s in live.nft.sets)
    return dataclasses.replace(live, nft=dataclasses.replace(live.nft, sets=sets))


def test_added_destinations_only_add_elements():
    live = converge(DESIRED, LiveState())
    bigger = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                   'destinations = ["198.18.0.0/16", "198.19.0.0/24", "2001:db8::/32"]\n'
                   'ports = [80, "8000-8080"]\n')
    (op,) = plan(render(bigger), live)
    # 198.19.0.0/24 extends 198.18.0.0/16: the range goes out and comes back whole
    assert isinstance(op, UpdateNftSet)
    assert op.removed == from_networks([net("198.18.0.0/16")])
    assert op.add == from_networks([net("198.18.0.0/16"),
                                    net("198.19.0.0/24")])
    assert plan(render(bigger), apply_all(live, [op])) == ()


def test_a_set_change_touches_only_the_ranges_that_changed():
    many = [f"198.18.{i}.0/25" for i in range(200)]
    before = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                   f'destinations = {many!r}\n'.replace("'", '"'))
    after = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                  f'destinations = {[*many[1:], "198.19.0.0/30"]!r}\n'.replace("'", '"'))
    live = converge(render(before), LiveState())
    (op,) = plan(render(after), live)
    assert isinstance(op, UpdateNftSet)
    assert (len(op.add), len(op.removed)) == (1, 1)
    assert "+1 (198.19.0.0/30) -1 (198.18.0.0/25)" in str(op)
    assert plan(render(after), apply_all(live, [op])) == ()


def test_down_plans_removal_in_reverse_and_restores_sysctls():
    live = converge(DESIRED, LiveState(sysctls={"net.ipv4.ip_forward": "0",
                                                "net.ipv6.conf.all.forwarding": "0"}))
    ops = plan_down(DESIRED.owner, live, {"net.ipv4.ip_forward": "0",
                                          "net.ipv6.conf.all.forwarding": "0"})
    assert isinstance(ops[0], DeleteNftTable)
    after = apply_all(live, ops)
    assert after.rules == frozenset() and after.routes == frozenset() and after.nft is None
    assert after.sysctls == {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"}
    assert plan_down(DESIRED.owner, after, {"net.ipv4.ip_forward": "0"}) == ()


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_plan_after_apply_is_empty_from_any_live_state(data):
    """For any valid desired state and any live state, applying the plan to the fake kernel
    (add fails if present, delete if absent) succeeds and leaves nothing to plan."""
    config = data.draw(configs())
    live = data.draw(live_states(config))
    desired = render(config)
    after = converge(desired, live)
    assert plan(desired, after) == ()
    ours = desired.owner.protocol
    assert {r for r in live.rules if r.protocol != ours} <= after.rules
    assert {r for r in live.routes if r.protocol != ours and r.key not in
            {d.key for d in desired.routes}} <= after.routes


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_down_after_apply_leaves_only_what_was_not_ours(data):
    config = data.draw(configs())
    live = data.draw(live_states(config))
    desired = render(config)
    after = converge(desired, live)
    down = apply_all(after, plan_down(desired.owner, after, {}))
    ours = desired.owner.protocol
    assert down.nft is None
    assert all(r.protocol != ours or r.other for r in down.rules)
    assert all(r.protocol != ours or r.table != config.routing.table for r in down.routes)
    assert {r for r in live.rules if r.protocol != ours or r.other} == down.rules


TAMPERED_KEYS = [
    "net.ipv4.conf./tmp/x.rp_filter",  # an absolute path as the interface part
    "net.ipv4.conf.lo/../../../../../tmp/x.rp_filter",
    "net/ipv4/ip_forward",
    "kernel.core_pattern",  # well formed, but not a key tproxyd writes
    "net.ipv4.conf.lan0.rp_filter",  # read by preflight, never written
    "net..ipv4.ip_forward",
    "",
]


@pytest.mark.parametrize("key", TAMPERED_KEYS)
def test_a_sysctl_op_only_names_a_key_tproxyd_writes(key):
    with pytest.raises(ValueError, match="sysctl"):
        SetSysctl(key, "1", None)


@pytest.mark.parametrize("value", ["", "1\n2", "|/tmp/x", "1" * 40])
def test_a_sysctl_op_only_carries_an_integer(value):
    with pytest.raises(ValueError, match="sysctl"):
        SetSysctl("net.ipv4.ip_forward", value, "1")


def test_down_refuses_a_saved_value_under_a_foreign_key():
    """What `down` restores comes from a file: a key it never wrote is not a plan."""
    with pytest.raises(ValueError):
        plan_down(DESIRED.owner, LiveState(), {"net.ipv4.conf./tmp/x.rp_filter": "0"})


def test_no_intercept_plans_nothing_from_nothing_and_removes_what_an_earlier_config_left():
    idle = render(loads("[relay]\nport = 12345\n"))
    assert plan(idle, LiveState()) == ()
    live = converge(DESIRED, LiveState())
    ops = plan(idle, live)
    assert {type(op) for op in ops} == {DeleteNftTable, DeleteRule, DeleteRoute}
    after = apply_all(live, ops)
    assert after.nft is None and after.rules == frozenset() and after.routes == frozenset()
    assert plan(idle, after) == ()
