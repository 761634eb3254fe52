"""Preflight: what silently breaks interception, said out loud, each with its fix in one line.

Pure: the reconciler gathers HostFacts from the kernel; this module only judges them.
An error stops `apply`; a warning does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Tuple

from .config import Config
from .desired import DEFAULT_DST, FORWARDING_SYSCTL
from .domains import sniff_notes
from .routing import Route, Rule
from .upstreams import UpstreamPath, captured_paths

ERROR, WARNING = "error", "warning"
BRIDGE_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}\n  fix: {self.fix}"

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HostFacts:
    """What the reconciler read off the host. None means "could not be read"."""

    sysctls: Mapping[str, str] = field(default_factory=dict)  # forwarding, rp_filter, bridge-nf
    interfaces: FrozenSet[str] = frozenset()
    bridged: FrozenSet[str] = frozenset()  # bridges and bridge ports
    policy_routing: Mapping[int, bool] = field(default_factory=lambda: {4: True, 6: True})
    rules: FrozenSet[Rule] = frozenset()
    table_routes: FrozenSet[Route] = frozenset()
    nft_error: str | None = None  # the kernel's answer to a dry run of our table, if it failed
    foreign_mark_users: Tuple[str, ...] = ()  # other nft tables' rules that read or set our marks
    # each upstream address (names resolved) with the interface the kernel routes it out of
    upstream_paths: Tuple[UpstreamPath, ...] = ()
    quic_sniffing: bool = True  # python3-cryptography is there: the relay reads QUIC names


def rp_filter_keys(config: Config) -> List[str]:
    keys = ["net.ipv4.conf.all.rp_filter"]
    for entry in config.intercepts:
        keys += [f"net.ipv4.conf.{i}.rp_filter" for i in entry.interfaces]
    return keys


def sysctl_keys(config: Config) -> List[str]:
    """Every sysctl preflight reads."""
    return sorted(set(FORWARDING_SYSCTL.values()) | set(rp_filter_keys(config)) | set(BRIDGE_SYSCTLS))


def _marks_overlap(rule: Rule, mark: int) -> bool:
    mask = rule.fwmask or (0xFFFFFFFF if rule.fwmark else 0)
    return bool(mask & mark) and (rule.fwmark & mask) == (mark & mask)


def check(config: Config, facts: HostFacts) -> List[Finding]:
    out: List[Finding] = []
    routing, marks = config.routing, config.marks

    if facts.nft_error:
        out.append(Finding(ERROR, f"the kernel refuses tproxyd's nftables table: {facts.nft_error}",
                           "load nftables' tproxy and socket support: modprobe nft_tproxy "
                           "nft_socket nft_fib_inet (kernel CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET)"))
    for version, ok in sorted(facts.policy_routing.items()):
        if not ok:
            out.append(Finding(ERROR, f"policy routing (ip{'' if version == 4 else ' -6'} rule) is "
                                      f"not available for IPv{version}",
                               f"use a kernel with CONFIG_IP{'' if version == 4 else 'V6'}"
                               "_MULTIPLE_TABLES=y"))

    if not config.intercepts:
        out.append(Finding(WARNING, "no [[intercept]] entry: nothing is captured",
                           "add an [[intercept]] with the LAN interfaces to tproxy.toml"))
    for note in sniff_notes(config.routes, facts.quic_sniffing):  # QUIC names need AES
        out.append(Finding(WARNING, note, "apt install python3-cryptography"))
    for version in config.families():
        key = FORWARDING_SYSCTL[version]
        value = facts.sysctls.get(key)
        if not routing.forwarding and value not in (None, "1"):
            out.append(Finding(WARNING, f"IPv{version} forwarding is off ({key} = {value}): "
                                        "the gateway does not route its clients' traffic",
                               f"sysctl -w {key}=1, or set routing.forwarding = true"))

    all_rp = _int(facts.sysctls.get("net.ipv4.conf.all.rp_filter"))
    for entry in config.intercepts:
        for ifname in entry.interfaces:
            if ifname not in facts.interfaces:
                out.append(Finding(WARNING, f"interface {ifname} (intercept '{entry.name}') does "
                                            "not exist: nothing is captured on it until it appears",
                                   f"check the name with `ip link`; fix intercept '{entry.name}' "
                                   "interfaces if it is wrong"))
                continue
            key = f"net.ipv4.conf.{ifname}.rp_filter"
            if max(all_rp, _int(facts.sysctls.get(key))) == 1:
                out.append(Finding(WARNING, f"strict reverse-path filtering on {ifname}: the kernel "
                                            "may drop intercepted or replied packets",
                                   f"sysctl -w {key}=2 net.ipv4.conf.all.rp_filter=2 (loose)"))

    on = [k for k in BRIDGE_SYSCTLS if facts.sysctls.get(k) == "1"]
    captured = sorted({i for e in config.intercepts for i in e.interfaces} & facts.bridged)
    if on and captured:
        out.append(Finding(WARNING, f"br_netfilter passes frames bridged on {', '.join(captured)} "
                                    f"through the IP hooks ({', '.join(on)} = 1): traffic that is "
                                    "only bridged, not routed, may be captured",
                           f"sysctl -w {'=0 '.join(on)}=0, or rmmod br_netfilter"))

    for rule in sorted(facts.rules):
        if rule.protocol == routing.protocol and rule.other:
            out.append(Finding(WARNING, f"a rule carries tproxyd's protocol tag but selectors "
                                        f"tproxyd never sets; it is left alone: {rule}",
                               f"remove it if it is a leftover: ip -{rule.family} rule del pref "
                               f"{rule.priority} {rule.other}"))
            continue
        if rule.protocol == routing.protocol:
            continue
        if rule.table == routing.table:
            out.append(Finding(ERROR, f"someone else's rule looks up our table {routing.table}: "
                                      f"{rule}", f"pick another routing.table, or remove it: "
                                      f"ip -{rule.family} rule del pref {rule.priority}"))
        elif _marks_overlap(rule, marks.intercept) and rule.priority <= routing.priority:
            out.append(Finding(ERROR, f"someone else's rule matches our intercept mark "
                                      f"{marks.intercept:#x} first: {rule}",
                               "pick another marks.intercept, or a lower routing.priority"))
        elif rule.priority == routing.priority:
            out.append(Finding(WARNING, f"someone else's rule shares our priority "
                                        f"{routing.priority}: {rule}",
                               "pick another routing.priority so the order is defined"))

    ours = {(v, dst) for v, dst in DEFAULT_DST.items()}
    for route in sorted(facts.table_routes):
        if route.protocol != routing.protocol and (route.family, route.dst) not in ours:
            out.append(Finding(ERROR, f"table {routing.table} holds a route tproxyd does not own: "
                                      f"{route}; intercepted packets to it would not reach the relay",
                               f"pick another routing.table, or move that route out of table "
                               f"{routing.table}"))

    for path, entry in captured_paths(config.intercepts, config.upstreams, facts.upstream_paths):
        out.append(Finding(WARNING, f"upstream '{path.upstream}' ({path.address}) is reached through "
                                    f"{path.interface}, where intercept '{entry.name}' captures that "
                                    "address: if it is routed through this gateway, its traffic "
                                    "comes back in and is captured again (a loop)",
                           f"add {path.address} to intercept '{entry.name}' exclude, or reach the "
                           "upstream through an interface that is not captured"))

    for where in facts.foreign_mark_users:
        out.append(Finding(WARNING, f"another nftables rule uses our marks: {where}",
                           "make sure it does not set or clear marks.intercept / marks.relay bits"))
    return out


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def errors(findings: List[Finding]) -> List[Finding]:
    return [f for f in findings if f.level == ERROR]
