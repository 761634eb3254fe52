"""One reconcile: read live state, plan against the desired state, apply, read back.

Everything here runs in the calling process's network namespace.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from tproxyd.state import preflight
from tproxyd.state.config import Config
from tproxyd.state.desired import DesiredState, render
from tproxyd.state.live import LiveState
from tproxyd.state.nft import (
    FAMILY,
    NftTable,
    delete_table_commands,
    replace_table_commands,
    update_set_commands,
)
from tproxyd.state.plan import (
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
    plan,
    plan_down,
)
from tproxyd.state.status import ObjectStatus, compare

from . import sysctl
from .errors import KernelError, PreflightError
from .netlink import Netlink
from .nft_backend import Nft, mark_users

NFT_OPS = (ReplaceNftTable, UpdateNftSet, DeleteNftTable)


def digest(intervals: tuple) -> str:
    return hashlib.sha256(repr(intervals).encode()).hexdigest()


@dataclass
class Result:
    ops: Tuple[Op, ...] = ()
    writes: int = 0  # kernel writes: netlink requests, nft transactions, sysctl writes
    findings: List[preflight.Finding] = field(default_factory=list)


class Reconciler:
    """Converges one network namespace (the caller's) to one Config."""

    def __init__(self, config: Config):
        self.config = config
        self.desired: DesiredState = render(config)
        self.netlink = Netlink()
        self.nft = Nft()
        self.memory = sysctl.SysctlMemory(config.daemon.state_dir)
        self.verified = sysctl.NetnsRecord(config.daemon.state_dir, "nft-verified")
        self.sysctl_writes = 0

    def close(self) -> None:
        self.netlink.close()

    @property
    def writes(self) -> int:
        return self.netlink.writes + self.nft.writes + self.sysctl_writes

    # --- reading ----------------------------------------------------------------------------

    def live(self) -> LiveState:
        keys = set(self.desired.sysctls) | set(self.memory.load())
        return LiveState(
            rules=self.netlink.rules(),
            routes=self.netlink.routes(self.config.routing.table),
            nft=self._read_nft(),
            sysctls={k: v for k in sorted(keys) if (v := sysctl.read(k)) is not None},
        )

    def _read_nft(self) -> NftTable | None:
        """Our table. Listing 100,000 set elements back costs about a second, so the contents
        verified last time are trusted while nftables' generation has not moved since (any
        change by anyone, `nft add element` included, moves it); the rest is always read."""
        name = self.config.nftables.table
        generation = self.nft.generation()  # before the listing: a later change moves it on
        seen = self.verified.load()
        if generation is not None and seen.get("generation") == generation \
                and seen.get("table") == name:
            table = self.nft.read_table(name, elements=False)
            if table is None:
                return None
            sets = []
            for s in table.sets:
                want = self.desired.nft.set_named(s.name)
                if want is None or seen.get("sets", {}).get(s.name) != digest(want.elements):
                    break  # contents we cannot vouch for: read them
                sets.append(dataclasses.replace(s, elements=want.elements))
            else:
                return dataclasses.replace(table, sets=tuple(sets))
        table = self.nft.read_table(name)
        if table is not None and generation is not None:
            self.verified.save({"generation": generation, "table": name,
                                "sets": {s.name: digest(s.elements) for s in table.sets}})
        return table

    def plan(self, live: LiveState | None = None) -> Tuple[Op, ...]:
        return plan(self.desired, live or self.live())

    def status(self, live: LiveState | None = None) -> List[ObjectStatus]:
        return compare(self.desired, live or self.live())

    def facts(self) -> preflight.HostFacts:
        values = {k: v for k in preflight.sysctl_keys(self.config)
                  if (v := sysctl.read(k)) is not None}
        marks = (self.config.marks.intercept, self.config.marks.relay)
        return preflight.HostFacts(
            sysctls=values,
            interfaces=frozenset(self.netlink.links().values()),
            bridged=self.netlink.bridged(),
            policy_routing=self.netlink.policy_routing(),
            rules=self.netlink.rules(),
            table_routes=self.netlink.routes(self.config.routing.table),
            # the structure alone: kernel support is what is checked, not 100,000 elements
            nft_error=self.nft.check(replace_table_commands(self.desired.nft.without_elements())),
            foreign_mark_users=tuple(mark_users(self.nft.ruleset_terse(),
                                                self.config.nftables.table, marks)),
        )

    def preflight(self) -> List[preflight.Finding]:
        return preflight.check(self.config, self.facts())

    # --- writing ----------------------------------------------------------------------------

    def apply(self, force: bool = False) -> Result:
        """Converge. Preflight errors stop it before any write unless force is set."""
        findings = self.preflight()
        if preflight.errors(findings) and not force:
            raise PreflightError("\n".join(str(f) for f in preflight.errors(findings)))
        before = self.writes
        ops = self.plan()
        if not ops:
            return Result(ops=ops, writes=0, findings=findings)
        self._run(ops)
        left = self.plan()  # read back: the kernel's view is the only proof
        if left:
            raise KernelError("converge", "still differs after apply: "
                                          + "; ".join(str(op) for op in left))
        return Result(ops=ops, writes=self.writes - before, findings=findings)

    def down(self, restore_sysctls: bool = True) -> Result:
        """Remove everything this config owns and (unless told not to, as when another config
        takes over) restore the sysctls tproxyd replaced."""
        before = self.writes
        saved = self.memory.load() if restore_sysctls else {}
        live = self.live()
        ops = plan_down(self.desired.owner, live, saved)
        self._run(ops, remember=False)
        if restore_sysctls:
            self.memory.clear()
        return Result(ops=ops, writes=self.writes - before)

    def _run(self, ops: Tuple[Op, ...], remember: bool = True) -> None:
        nft_ops = [op for op in ops if isinstance(op, NFT_OPS)]
        nft_done = False
        for op in ops:
            if isinstance(op, NFT_OPS):
                if not nft_done:  # all nft changes of a plan in one transaction
                    self._nft(nft_ops)
                    nft_done = True
            elif isinstance(op, SetSysctl):
                if remember:
                    self._remember(op)
                self.sysctl_writes += 1
                sysctl.write(op.key, op.value)
            elif isinstance(op, AddRule):
                self.netlink.add_rule(op.rule)
            elif isinstance(op, DeleteRule):
                self.netlink.delete_rule(op.rule)
            elif isinstance(op, AddRoute):
                self.netlink.add_route(op.route)
            elif isinstance(op, ReplaceRoute):
                self.netlink.add_route(op.route, replace=True)
            elif isinstance(op, DeleteRoute):
                self.netlink.delete_route(op.route)
            else:  # pragma: no cover - exhaustive over Op
                raise TypeError(f"unknown operation {op!r}")

    def _remember(self, op: SetSysctl) -> None:
        """Keep the value tproxyd is about to replace, unless it was kept already: after a crash
        or a hand edit, the first value seen is still the one to restore."""
        saved: Dict[str, str] = self.memory.load()
        if op.previous is not None and op.key not in saved:
            saved[op.key] = op.previous
            self.memory.save(saved)

    def _nft(self, ops: List[Op]) -> None:
        commands = []
        for op in ops:
            if isinstance(op, ReplaceNftTable):
                commands += replace_table_commands(op.table)
            elif isinstance(op, UpdateNftSet):
                commands += update_set_commands(op.table, op.set, op.add, op.flush)
            elif isinstance(op, DeleteNftTable):
                commands += delete_table_commands(op.name)
        self.nft.transaction(f"nft transaction on table {FAMILY} "
                             f"{self.config.nftables.table}", commands)

