"""Operations and the planner: plan(desired, live) -> the ordered changes that converge live to desired.

Operations are frozen values that print as a network engineer reads them; the same objects
drive `tproxy plan`, the logs and the apply layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple, Union

from .desired import WRITTEN_SYSCTLS, DesiredState, Owner
from .intervals import Intervals, changed_ranges, describe
from .live import LiveState
from .nft import FAMILY, NftSet, NftTable
from .routing import Route, Rule


@dataclass(frozen=True)
class AddRule:
    rule: Rule

    def __str__(self) -> str:
        return f"+ {self.rule}"


@dataclass(frozen=True)
class DeleteRule:
    rule: Rule

    def __str__(self) -> str:
        return f"- {self.rule}"


@dataclass(frozen=True)
class AddRoute:
    route: Route

    def __str__(self) -> str:
        return f"+ {self.route}"


@dataclass(frozen=True)
class ReplaceRoute:
    route: Route
    old: Route

    def __str__(self) -> str:
        return f"~ {self.route} (was: {self.old})"


@dataclass(frozen=True)
class DeleteRoute:
    route: Route

    def __str__(self) -> str:
        return f"- {self.route}"


@dataclass(frozen=True)
class ReplaceNftTable:
    """Build the whole table in one transaction (deleting the old one inside it, if any)."""

    table: NftTable
    reason: str

    def __str__(self) -> str:
        t = self.table
        ranges = sum(len(s.elements) for s in t.sets)
        sign = "+" if self.reason == "missing" else "~"
        return (f"{sign} nft table {FAMILY} {t.name}: {self.reason}; {len(t.chains)} chains, "
                f"{t.rule_count()} rules, {len(t.sets)} sets with {ranges} ranges")


@dataclass(frozen=True)
class UpdateNftSet:
    """Change a set's contents by whole ranges (a range that grew goes out and comes back in
    its new size), in one transaction."""

    table: str
    set: NftSet  # with its complete desired contents
    old: Intervals  # its contents now
    add: Intervals  # ranges to add
    removed: Intervals  # ranges to delete

    def __str__(self) -> str:
        parts = []
        if self.add:
            parts.append(f"+{len(self.add)} ({describe(self.set.type, self.add)})")
        if self.removed:
            parts.append(f"-{len(self.removed)} ({describe(self.set.type, self.removed)})")
        return (f"~ nft set {FAMILY} {self.table} {self.set.name}: {' '.join(parts)}; "
                f"{len(self.set.elements)} ranges after")


@dataclass(frozen=True)
class DeleteNftTable:
    name: str

    def __str__(self) -> str:
        return f"- nft table {FAMILY} {self.name}"


SYSCTL_KEY = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+")
SYSCTL_VALUE = re.compile(r"-?[0-9]{1,19}")


def check_sysctl(key: str, value: str) -> None:
    """ValueError unless key is one tproxyd writes and value an integer. Values to restore come
    from a file in state_dir, and `down` writes them as root: nothing else may get through."""
    if not SYSCTL_KEY.fullmatch(key) or key not in WRITTEN_SYSCTLS:
        raise ValueError(f"sysctl {key!r} is not one tproxyd writes "
                         f"({', '.join(sorted(WRITTEN_SYSCTLS))})")
    if not SYSCTL_VALUE.fullmatch(value):
        raise ValueError(f"sysctl {key} = {value!r}: not an integer")


@dataclass(frozen=True)
class SetSysctl:
    key: str
    value: str
    previous: str | None  # as read, shown only

    def __post_init__(self) -> None:
        check_sysctl(self.key, self.value)

    def __str__(self) -> str:
        return f"~ sysctl {self.key} = {self.value} (was {self.previous})"


Op = Union[AddRule, DeleteRule, AddRoute, ReplaceRoute, DeleteRoute, ReplaceNftTable,
           UpdateNftSet, DeleteNftTable, SetSysctl]


def op_to_json(op: Op) -> Dict[str, Any]:
    """A stable JSON form for `tproxy plan --json` and logs."""
    kind = type(op).__name__
    if isinstance(op, (AddRule, DeleteRule)):
        return {"op": kind, "text": str(op), "rule": op.rule.__dict__}
    if isinstance(op, (AddRoute, DeleteRoute, ReplaceRoute)):
        return {"op": kind, "text": str(op), "route": op.route.__dict__}
    if isinstance(op, ReplaceNftTable):
        return {"op": kind, "text": str(op), "table": op.table.name, "reason": op.reason}
    if isinstance(op, UpdateNftSet):
        return {"op": kind, "text": str(op), "table": op.table, "set": op.set.name,
                "added": len(op.add), "removed": len(op.removed)}
    if isinstance(op, DeleteNftTable):
        return {"op": kind, "text": str(op), "table": op.name}
    return {"op": kind, "text": str(op), "key": op.key, "value": op.value, "previous": op.previous}


def owned_rules(owner: Owner, live: LiveState) -> List[Rule]:
    """Rules carrying our protocol and nothing we do not make: a rule with other selectors
    (iif, from, ...) is someone's, whatever its tag, and deleting it by our attributes alone
    could take ours instead (the kernel treats absent selectors as wildcards)."""
    return sorted(r for r in live.rules if r.protocol == owner.protocol and not r.other)


def owned_routes(owner: Owner, live: LiveState) -> List[Route]:
    return sorted(r for r in live.routes if r.protocol == owner.protocol and r.table == owner.table)


def _nft_ops(desired: NftTable | None, live: NftTable | None) -> List[Op]:
    if desired is None:  # nothing to intercept: our table (live is read by our name) goes
        return [] if live is None else [DeleteNftTable(live.name)]
    if live is None:
        return [ReplaceNftTable(desired, "missing")]
    if live.structure() != desired.structure():
        return [ReplaceNftTable(desired, "chains, rules or sets differ")]
    ops: List[Op] = []
    for want in desired.sets:
        have = live.set_named(want.name)
        assert have is not None  # equal structure: same set names
        if have.elements == want.elements:
            continue
        add, removed = changed_ranges(have.elements, want.elements)
        ops.append(UpdateNftSet(desired.name, want, have.elements, add, removed))
    return ops


def plan(desired: DesiredState, live: LiveState) -> Tuple[Op, ...]:
    """The ordered operations that make live equal desired, touching only what desired.owner owns.

    Order: sysctls, routes and rules first, so that by the time nft marks a packet the route that
    delivers it exists; removals of what is no longer wanted last.
    """
    owner = desired.owner
    ops: List[Op] = []
    for key, value in sorted(desired.sysctls.items()):
        if live.sysctls.get(key) != value:
            ops.append(SetSysctl(key, value, live.sysctls.get(key)))

    live_by_key = {r.key: r for r in live.routes}
    wanted_keys = set()
    for route in sorted(desired.routes):
        wanted_keys.add(route.key)
        have = live_by_key.get(route.key)
        if have is None:
            ops.append(AddRoute(route))
        elif have != route:
            ops.append(ReplaceRoute(route, have))

    for rule in sorted(desired.rules - live.rules):
        ops.append(AddRule(rule))

    ops += _nft_ops(desired.nft, live.nft)

    for rule in owned_rules(owner, live):
        if rule not in desired.rules:
            ops.append(DeleteRule(rule))
    for route in owned_routes(owner, live):
        if route.key not in wanted_keys:
            ops.append(DeleteRoute(route))
    return tuple(ops)


def plan_down(owner: Owner, live: LiveState, saved_sysctls: Mapping[str, str]) -> Tuple[Op, ...]:
    """Remove everything owner owns, in the reverse order of apply, and restore saved sysctls."""
    ops: List[Op] = []
    if live.nft is not None:
        ops.append(DeleteNftTable(owner.nft_table))
    ops += [DeleteRule(r) for r in owned_rules(owner, live)]
    ops += [DeleteRoute(r) for r in owned_routes(owner, live)]
    for key, value in sorted(saved_sysctls.items()):
        if live.sysctls.get(key) != value:
            ops.append(SetSysctl(key, value, live.sysctls.get(key)))
    return tuple(ops)
