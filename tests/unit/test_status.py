"""Status compares object by object: in sync, missing, drifted, extra."""

from __future__ import annotations

import dataclasses

from tproxyd.state.desired import render
from tproxyd.state.live import LiveState
from tproxyd.state.loader import loads
from tproxyd.state.plan import plan
from tproxyd.state.routing import Rule
from tproxyd.state.simulate import apply_all
from tproxyd.state.status import DRIFTED, EXTRA, IN_SYNC, MISSING, compare, in_sync

DESIRED = render(loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'))


def states(statuses):
    return {(s.kind, s.state) for s in statuses}


def test_nothing_applied_is_all_missing():
    statuses = compare(DESIRED, LiveState())
    assert {s.state for s in statuses} == {MISSING, DRIFTED}  # sysctls absent read as drifted
    assert not in_sync(statuses)


def test_converged_is_in_sync_and_drift_is_named():
    live = apply_all(LiveState(), plan(DESIRED, LiveState()))
    assert in_sync(compare(DESIRED, live))
    v4 = next(r for r in live.rules if r.family == 4)
    route = next(r for r in live.routes if r.family == 4)
    chains = tuple(dataclasses.replace(c, rules=c.rules[:1]) for c in live.nft.chains)
    drifted = dataclasses.replace(
        live, rules=(live.rules - {v4}) | {Rule(4, 9, 100, 1, 1, 201)},
        routes=(live.routes - {route}) | {dataclasses.replace(route, dev="eth0")},
        nft=dataclasses.replace(live.nft, chains=chains),
        sysctls={**live.sysctls, "net.ipv4.ip_forward": "0"})
    by = {(s.kind, s.name): s for s in compare(DESIRED, drifted)}
    assert by[("rule", str(v4))].state == MISSING
    assert by[("rule", str(Rule(4, 9, 100, 1, 1, 201)))].state == EXTRA
    assert by[("route", str(route))].state == DRIFTED and "eth0" in by[("route", str(route))].detail
    table = by[("nft table", "inet tproxyd")]
    assert table.state == DRIFTED and "chain prerouting: 1 of 5 rules" in table.detail
    assert by[("sysctl", "net.ipv4.ip_forward = 1")].state == DRIFTED
    assert by[("nft set", "lan_dst4")].state == IN_SYNC


def test_no_intercept_is_in_sync_with_nothing_and_names_a_leftover_table():
    from tproxyd.state.desired import render
    from tproxyd.state.live import LiveState
    from tproxyd.state.loader import loads
    from tproxyd.state.status import EXTRA, compare, in_sync

    idle = render(loads("[relay]\n"))
    assert compare(idle, LiveState()) == [] and in_sync(compare(idle, LiveState()))
    leftover = render(loads('[[intercept]]\ninterfaces = ["lan0"]\n')).nft
    (table,) = compare(idle, LiveState(nft=leftover))
    assert table.kind == "nft table" and table.state == EXTRA
