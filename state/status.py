"""Desired against live, object by object: in sync, missing, drifted or extra (`tproxy status`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List

from .desired import DesiredState
from .intervals import subtract
from .live import LiveState
from .nft import FAMILY, NftTable
from .plan import owned_routes, owned_rules

IN_SYNC, MISSING, DRIFTED, EXTRA = "in sync", "missing", "drifted", "extra"


@dataclass(frozen=True)
class ObjectStatus:
    kind: str  # rule, route, nft table, nft set, sysctl
    name: str
    state: str
    detail: str = ""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _table_drift(want: NftTable, have: NftTable) -> str:
    notes: List[str] = []
    have_chains = {c.name: c for c in have.chains}
    for c in want.chains:
        h = have_chains.pop(c.name, None)
        if h is None:
            notes.append(f"chain {c.name} missing")
        elif h.signature() != c.signature():
            wanted = {r.comment for r in c.rules}
            kept = sum(1 for r in h.rules if r.comment in wanted)
            notes.append(f"chain {c.name}: {kept} of {len(c.rules)} rules in place, "
                         f"{len(h.rules) - kept} unknown")
    notes += [f"unknown chain {name}" for name in have_chains]
    want_sets = {s.name: s for s in want.sets}
    for s in have.sets:
        w = want_sets.pop(s.name, None)
        if w is None:
            notes.append(f"unknown set {s.name}")
        elif w.signature() != s.signature():
            notes.append(f"set {s.name} has type {s.type} flags {','.join(s.flags)}")
    notes += [f"set {name} missing" for name in want_sets]
    return "; ".join(notes)


def compare(desired: DesiredState, live: LiveState) -> List[ObjectStatus]:
    out: List[ObjectStatus] = []
    for rule in sorted(desired.rules):
        out.append(ObjectStatus("rule", str(rule), IN_SYNC if rule in live.rules else MISSING))
    out += [ObjectStatus("rule", str(r), EXTRA) for r in owned_rules(desired.owner, live)
            if r not in desired.rules]

    live_routes = {r.key: r for r in live.routes}
    for route in sorted(desired.routes):
        have = live_routes.get(route.key)
        if have is None:
            out.append(ObjectStatus("route", str(route), MISSING))
        elif have != route:
            out.append(ObjectStatus("route", str(route), DRIFTED, f"live: {have}"))
        else:
            out.append(ObjectStatus("route", str(route), IN_SYNC))
    wanted = {r.key for r in desired.routes}
    out += [ObjectStatus("route", str(r), EXTRA) for r in owned_routes(desired.owner, live)
            if r.key not in wanted]

    want, have = desired.nft, live.nft
    if want is None:  # nothing to intercept: any table of ours is extra
        if have is not None:
            out.append(ObjectStatus("nft table", f"{FAMILY} {have.name}", EXTRA))
        return out
    name = f"{FAMILY} {want.name}"
    if have is None:
        out.append(ObjectStatus("nft table", name, MISSING))
    elif have.structure() != want.structure():
        out.append(ObjectStatus("nft table", name, DRIFTED, _table_drift(want, have)))
    else:
        out.append(ObjectStatus("nft table", name, IN_SYNC,
                                f"{len(want.chains)} chains, {want.rule_count()} rules"))
    for s in want.sets:
        live_set = have.set_named(s.name) if have else None
        out.append(_set_status(s.name, s.elements, live_set.elements if live_set else None))

    for key, value in sorted(desired.sysctls.items()):
        got = live.sysctls.get(key)
        out.append(ObjectStatus("sysctl", f"{key} = {value}", IN_SYNC if got == value else DRIFTED,
                                "" if got == value else f"live: {got}"))
    return out


def _set_status(name: str, want: tuple, have: tuple | None) -> ObjectStatus:
    if have is None:
        return ObjectStatus("nft set", name, MISSING, f"{len(want)} ranges wanted")
    if have == want:
        return ObjectStatus("nft set", name, IN_SYNC, f"{len(want)} ranges")
    return ObjectStatus("nft set", name, DRIFTED, f"{len(subtract(want, have))} ranges to add, "
                                                  f"{len(subtract(have, want))} to remove")


def in_sync(statuses: List[ObjectStatus]) -> bool:
    return all(s.state == IN_SYNC for s in statuses)
