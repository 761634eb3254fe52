"""A fake kernel: applies operations to a LiveState with the kernel's semantics.

Adding what exists fails, deleting what is absent fails, an nft transaction commits whole or
not at all. Tests assert the resulting state (and that a second plan is empty), not call lists;
the same scenarios run against the real kernel in namespaces.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable

from .intervals import merge
from .live import LiveState
from .plan import (
    AddRoute,
    AddRule,
    DeleteNftTable,
    DeleteRoute,
    DeleteRule,
    Op,
    ReplaceNftTable,
    ReplaceRoute,
    SetSysctl,
    UpdateNftSet,
)


class KernelError(Exception):
    """What the kernel would answer with an errno (EEXIST, ENOENT)."""


def apply_op(live: LiveState, op: Op) -> LiveState:
    if isinstance(op, AddRule):
        if op.rule in live.rules:
            raise KernelError(f"EEXIST: {op.rule}")
        return dataclasses.replace(live, rules=live.rules | {op.rule})
    if isinstance(op, DeleteRule):
        if op.rule not in live.rules:
            raise KernelError(f"ENOENT: {op.rule}")
        return dataclasses.replace(live, rules=live.rules - {op.rule})
    if isinstance(op, AddRoute):
        if any(r.key == op.route.key for r in live.routes):
            raise KernelError(f"EEXIST: {op.route}")
        return dataclasses.replace(live, routes=live.routes | {op.route})
    if isinstance(op, ReplaceRoute):
        kept = frozenset(r for r in live.routes if r.key != op.route.key)
        return dataclasses.replace(live, routes=kept | {op.route})
    if isinstance(op, DeleteRoute):
        if op.route not in live.routes:
            raise KernelError(f"ENOENT: {op.route}")
        return dataclasses.replace(live, routes=live.routes - {op.route})
    if isinstance(op, ReplaceNftTable):
        return dataclasses.replace(live, nft=op.table)
    if isinstance(op, UpdateNftSet):
        if live.nft is None or live.nft.name != op.table or live.nft.set_named(op.set.name) is None:
            raise KernelError(f"ENOENT: set {op.table} {op.set.name}")
        old = live.nft.set_named(op.set.name)
        assert old is not None
        kept = set(old.elements)
        for r in op.removed:
            if r not in kept:
                raise KernelError(f"ENOENT: range {r} in set {op.set.name}")
            kept.discard(r)
        if any(r in kept for r in op.add):
            raise KernelError(f"EEXIST: a range of {op.add} in set {op.set.name}")
        elements = merge(tuple(kept) + op.add)
        sets = tuple(dataclasses.replace(s, elements=elements) if s.name == op.set.name else s
                     for s in live.nft.sets)
        return dataclasses.replace(live, nft=dataclasses.replace(live.nft, sets=sets))
    if isinstance(op, DeleteNftTable):
        if live.nft is None:
            raise KernelError(f"ENOENT: table {op.name}")
        return dataclasses.replace(live, nft=None)
    if isinstance(op, SetSysctl):
        sysctls: Dict[str, str] = dict(live.sysctls)
        sysctls[op.key] = op.value
        return dataclasses.replace(live, sysctls=sysctls)
    raise TypeError(f"unknown operation {op!r}")


def apply_all(live: LiveState, ops: Iterable[Op]) -> LiveState:
    for op in ops:
        live = apply_op(live, op)
    return live

