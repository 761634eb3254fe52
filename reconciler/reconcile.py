"""One reconcile: read live state, plan against the desired state, apply, read back.

Everything here runs in the calling process's network namespace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from tproxyd.state import preflight
from tproxyd.state.config import Config
from tproxyd.state.desired import DesiredState, render
from tproxyd.state.domains import quic_sniffing_available
from tproxyd.state.intervals import digest, element_changes, to_kernel
from tproxyd.state.live import LiveState
from tproxyd.state.nft import (
    FAMILY,
    ListingError,
    NftSet,
    NftTable,
    delete_table_commands,
    replace_table_commands,
    table_from_ruleset,
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
from .desired_cache import Rendered
from .errors import KernelError, PreflightError
from .netlink import Netlink
from .nfnetlink import GenerationMoved, NftNetlink, SetChange
from .nft_backend import Nft, mark_users
from .verified import VerifiedSets

NFT_OPS = (ReplaceNftTable, UpdateNftSet, DeleteNftTable)
ATOMIC_RANGES = 10_000  # sets up to this size load inside libnftables' transaction (~0.1 s)
ATTEMPTS = 3  # plans made again when nftables moved on under one (GenerationMoved)


@dataclass
class Result:
    ops: Tuple[Op, ...] = ()
    writes: int = 0  # kernel writes: netlink requests, nft transactions, sysctl writes
    findings: List[preflight.Finding] = field(default_factory=list)


class Reconciler:
    """Converges one network namespace (the caller's) to one Config."""

    def __init__(self, config: Config, rendered: Rendered | None = None):
        """rendered: the config's desired state from desired_cache, if the caller has it."""
        self.config = config
        self.desired: DesiredState = rendered.desired if rendered else render(config)
        self._digests: Dict[str, str] = dict(rendered.digests) if rendered else {}
        self.netlink = Netlink()
        self.nft = Nft()
        self.netlink_nft = NftNetlink()
        self.generation: int | None = None  # nftables' generation when live state was read
        self._ruleset: List[Dict] | None = None
        self._untidy: set = set()
        self.memory = sysctl.SysctlMemory(config.daemon.state_dir)
        self.verified = VerifiedSets(config.daemon.state_dir)
        self.sysctl_writes = 0

    def close(self) -> None:
        self.netlink.close()
        self.netlink_nft.close()

    @property
    def writes(self) -> int:
        return (self.netlink.writes + self.nft.writes + self.netlink_nft.writes
                + self.sysctl_writes)

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
        """Our table: its structure from a terse listing of the ruleset (no elements: cheap at
        any size), each set's contents by a netlink dump, unless they were verified (read, or
        written by us) at the generation nftables is still at: any change by anyone, `nft add
        element` included, moves it on."""
        name = self.config.nftables.table
        self.generation = self._generation()  # before reading: a later change moves it on
        self._ruleset = self.nft.ruleset_terse()
        try:
            table = table_from_ruleset(name, self._ruleset)
        except ListingError as exc:
            raise KernelError(f"read table {FAMILY} {name}", str(exc)) from exc
        if table is None:
            return None
        trusted = self.verified.trusted(name, self.generation)
        self._untidy = set()  # sets whose elements only a flush can clear: see set_change
        sets, known = [], {}
        for s in table.sets:
            want = self.desired.nft.set_named(s.name) if self.desired.nft else None
            seen = trusted.get(s.name)
            if want is None or want.type != s.type or tuple(sorted(want.flags)) != tuple(
                    sorted(s.flags)):
                # not a set we make (maybe of a type we cannot read): the structure differs,
                # so the whole table is rebuilt anyway; its contents do not matter
                sets.append(s)
                continue
            if seen and seen == self._digest(want):
                elements = want.elements
            elif not seen or (elements := self.verified.contents(s.name, seen)) is None:
                elements, tidy = self.netlink_nft.set_elements(name, s.name, s.type,
                                                               "interval" in s.flags)
                seen = digest(elements)
                if not tidy:  # not recorded as known: read (and found untidy) again next time
                    self._untidy.add(s.name)
            if s.name not in self._untidy:
                known[s.name] = (seen, elements)
            sets.append(dataclasses.replace(s, elements=elements))
        if self.generation is not None and {n: d for n, (d, _) in known.items()} != trusted:
            self.verified.save(name, self.generation, known)
        return dataclasses.replace(table, sets=tuple(sets))

    def _digest(self, want: NftSet) -> str:
        """Of a desired set's contents: computed once (30 ms at 100,000 ranges)."""
        if want.name not in self._digests:
            self._digests[want.name] = digest(want.elements)
        return self._digests[want.name]

    def _generation(self) -> int | None:
        try:
            return self.netlink_nft.generation()
        except OSError:
            return None

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
            nft_error=None if self.desired.nft is None else self.nft.check(
                replace_table_commands(self.desired.nft.without_elements())),
            foreign_mark_users=tuple(mark_users(self._ruleset or self.nft.ruleset_terse(),
                                                self.config.nftables.table, marks)),
            quic_sniffing=quic_sniffing_available(),
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
        for attempt in range(ATTEMPTS):
            ops = self.plan()
            if not ops:
                return Result(ops=ops, writes=0, findings=findings)
            try:
                self._run(ops)
                break
            except GenerationMoved:  # someone changed nftables since we read it: read again
                if attempt == ATTEMPTS - 1:
                    raise KernelError("converge", "nftables kept changing while tproxyd applied "
                                                  f"its plan ({ATTEMPTS} attempts)") from None
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
        """libnftables for the structure, one generation-guarded netlink batch for contents.

        A new table is built in one libnftables transaction with its small sets filled; sets of
        more than ATOMIC_RANGES ranges are filled by the batch right after it (libnftables takes
        seconds at 100,000): for that moment they are empty (a destination set captures
        nothing, an exclusion set excludes nothing).
        """
        name = self.config.nftables.table
        commands: List[Dict] = []
        changes: List[SetChange] = []
        for op in ops:
            if isinstance(op, ReplaceNftTable):
                small = dataclasses.replace(op.table, sets=tuple(
                    s if len(s.elements) <= ATOMIC_RANGES else dataclasses.replace(s, elements=())
                    for s in op.table.sets))
                commands += replace_table_commands(small)
                changes += [SetChange(s.name, s.type, add=tuple(to_kernel(s.type, s.elements)))
                            for s in op.table.sets if len(s.elements) > ATOMIC_RANGES]
            elif isinstance(op, UpdateNftSet):
                changes.append(set_change(op, flush=op.set.name in self._untidy))
            elif isinstance(op, DeleteNftTable):
                commands += delete_table_commands(op.name)
        genid, alone = self.generation, True
        if commands:
            before = self._generation()
            self.nft.transaction(f"nft transaction on table {FAMILY} {name}", commands)
            genid = self._generation()
            # anyone else's commit between ours and that read could have touched a small set
            alone = before is not None and genid == before + 1
        if changes:
            self.netlink_nft.change_sets(name, changes, genid)
            if genid is not None and alone:  # the batch committed at genid: it made genid + 1
                # After a rebuild every set was loaded whole (laid out as to_kernel does); after
                # a contents change, a set laid out by someone else stays unknown unless the
                # batch flushed it.
                rebuilt = bool(commands)
                flushed = {c.name for c in changes if c.flush}
                self.verified.save(name, genid + 1, {
                    s.name: (self._digest(s), s.elements)
                    for s in (self.desired.nft.sets if self.desired.nft else ())
                    if rebuilt or s.name not in self._untidy or s.name in flushed})


def set_change(op: UpdateNftSet, flush: bool = False) -> SetChange:
    """Whole ranges out and in; or, for a set whose elements someone laid out otherwise, empty
    it and load it whole."""
    if flush:
        return SetChange(op.set.name, op.set.type, add=tuple(to_kernel(op.set.type, op.set.elements)),
                         flush=True)
    delete, add = element_changes(op.set.type, op.old, op.add, op.removed)
    return SetChange(op.set.name, op.set.type, delete=tuple(delete), add=tuple(add))
