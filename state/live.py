"""The kernel's state as read back: what the planner compares the desired state with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Mapping

from .nft import NftTable
from .routing import Route, Rule


@dataclass(frozen=True)
class LiveState:
    rules: FrozenSet[Rule] = frozenset()  # every rule of both families, ours and others'
    routes: FrozenSet[Route] = frozenset()  # every route in our table, whoever tagged it
    nft: NftTable | None = None  # our table, or None when absent
    sysctls: Mapping[str, str] = field(default_factory=dict)  # values of the keys we manage
