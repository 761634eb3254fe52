"""Our nftables table as data, and the JSON commands (libnftables JSON API) that build or change it.

A rule is identified by its comment, which ends in a hash of its expression: the kernel lists
expressions back in its own normal form, but comments verbatim. A rule edited by hand under our
comment is the one drift this cannot see; flushed, deleted or added rules it does see.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from .intervals import Intervals, from_elements, to_elements

FAMILY = "inet"
MAX_LABEL = 100  # + " [<10 hex>]" stays under nft's 128-byte comment limit


@dataclass(frozen=True)
class NftRule:
    comment: str  # "<label> [<hash>]": the identity the planner compares
    expr: str = "[]"  # JSON text of the expression list (kept hashable)

    @classmethod
    def make(cls, label: str, expr: List[Dict[str, Any]]) -> NftRule:
        text = json.dumps(expr, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        if len(label) > MAX_LABEL:  # nft keeps at most 128 bytes of comment
            label = label[: MAX_LABEL - 3] + "..."
        return cls(comment=f"{label} [{digest}]", expr=text)


@dataclass(frozen=True)
class NftChain:
    name: str
    type: str | None = None  # base chains only: "filter", with hook, prio, policy
    hook: str | None = None
    prio: int | None = None
    policy: str | None = None
    rules: Tuple[NftRule, ...] = ()

    def signature(self) -> tuple:
        return (self.name, self.type, self.hook, self.prio, self.policy,
                tuple(r.comment for r in self.rules))


@dataclass(frozen=True)
class NftSet:
    name: str
    type: str  # ipv4_addr, ipv6_addr, inet_service
    flags: Tuple[str, ...] = ("interval",)
    elements: Intervals = ()

    def signature(self) -> tuple:
        return (self.name, self.type, tuple(sorted(self.flags)))


@dataclass(frozen=True)
class NftTable:
    name: str
    chains: Tuple[NftChain, ...] = ()
    sets: Tuple[NftSet, ...] = field(default_factory=tuple)

    def structure(self) -> tuple:
        """Everything but set contents: a difference here means the table is replaced whole."""
        return (tuple(sorted(c.signature() for c in self.chains)),
                tuple(sorted(s.signature() for s in self.sets)))

    def set_named(self, name: str) -> NftSet | None:
        return next((s for s in self.sets if s.name == name), None)

    def without_elements(self) -> NftTable:
        return dataclasses.replace(self, sets=tuple(dataclasses.replace(s, elements=())
                                                    for s in self.sets))

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains)


# --- JSON commands -------------------------------------------------------------------------------

def _table_ref(table: str) -> Dict[str, Any]:
    return {"family": FAMILY, "name": table}


def _set_obj(table: str, s: NftSet) -> Dict[str, Any]:
    return {"family": FAMILY, "table": table, "name": s.name, "type": s.type, "flags": list(s.flags)}


def _elements_cmd(verb: str, table: str, s: NftSet, intervals: Intervals) -> Dict[str, Any]:
    return {verb: {"element": {"family": FAMILY, "table": table, "name": s.name,
                               "elem": to_elements(s.type, intervals)}}}


def replace_table_commands(t: NftTable) -> List[Dict[str, Any]]:
    """Delete (if present) and rebuild the whole table: one transaction, never seen half-written.

    `add table` first makes the `delete` valid when the table is absent.
    """
    cmds: List[Dict[str, Any]] = [
        {"add": {"table": _table_ref(t.name)}},
        {"delete": {"table": _table_ref(t.name)}},
        {"add": {"table": _table_ref(t.name)}},
    ]
    for s in t.sets:
        cmds.append({"add": {"set": _set_obj(t.name, s)}})
        if s.elements:
            cmds.append(_elements_cmd("add", t.name, s, s.elements))
    for c in t.chains:
        chain: Dict[str, Any] = {"family": FAMILY, "table": t.name, "name": c.name}
        if c.hook:
            chain.update(type=c.type, hook=c.hook, prio=c.prio, policy=c.policy)
        cmds.append({"add": {"chain": chain}})
    for c in t.chains:
        for r in c.rules:
            cmds.append({"add": {"rule": {"family": FAMILY, "table": t.name, "chain": c.name,
                                          "comment": r.comment, "expr": json.loads(r.expr)}}})
    return cmds


def delete_table_commands(table: str) -> List[Dict[str, Any]]:
    return [{"delete": {"table": _table_ref(table)}}]


# --- reading the kernel's listing ----------------------------------------------------------------

class ListingError(ValueError):
    """The listing of our table holds something this model cannot read."""


def table_from_ruleset(name: str, ruleset: List[Dict[str, Any]]) -> NftTable | None:
    """Our table from `nft -j list ruleset` objects: those of table inet NAME only."""
    ours = []
    for item in ruleset:
        for kind, obj in item.items():
            if isinstance(obj, dict) and obj.get("family") == FAMILY \
                    and obj.get("name" if kind == "table" else "table") == name:
                ours.append(item)
    return table_from_listing(name, ours)


def table_from_listing(name: str, listing: List[Dict[str, Any]]) -> NftTable | None:
    """Build the live NftTable from `nft -j list table inet NAME` objects (None if absent)."""
    found = False
    chains: Dict[str, Dict[str, Any]] = {}
    rules: Dict[str, List[NftRule]] = {}
    sets: List[NftSet] = []
    for item in listing:
        if "table" in item and item["table"].get("name") == name:
            found = True
        elif "chain" in item:
            c = item["chain"]
            chains[c["name"]] = c
        elif "set" in item:
            s = item["set"]
            flags = s.get("flags", [])
            flags = (flags,) if isinstance(flags, str) else tuple(flags)
            set_type = s.get("type")
            if not isinstance(set_type, str):
                raise ListingError(f"set {s.get('name')} has a type this model cannot read: {set_type}")
            try:
                elements = from_elements(set_type, s.get("elem", []))
            except (ValueError, KeyError, TypeError) as exc:
                raise ListingError(f"set {s.get('name')}: {exc}") from exc
            sets.append(NftSet(name=s["name"], type=set_type, flags=flags, elements=elements))
        elif "rule" in item:
            r = item["rule"]
            text = json.dumps(r.get("expr", []), sort_keys=True, separators=(",", ":"))
            rules.setdefault(r["chain"], []).append(NftRule(comment=r.get("comment", ""), expr=text))
    if not found:
        return None
    return NftTable(
        name=name,
        chains=tuple(NftChain(name=c["name"], type=c.get("type"), hook=c.get("hook"),
                              prio=c.get("prio"), policy=c.get("policy"),
                              rules=tuple(rules.get(c["name"], ())))
                     for c in chains.values()),
        sets=tuple(sets),
    )
