"""Policy rules and routes over rtnetlink (pyroute2): read them as values, change them one call each."""

from __future__ import annotations

import socket
from typing import Dict, FrozenSet, List

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tproxyd.state.routing import Route, Rule

from .errors import KernelError

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
RT_SCOPE_HOST = 254
FR_ACT_TO_TBL = 1


class Netlink:
    """One rtnetlink socket in the caller's network namespace. `writes` counts changes sent."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.writes = 0

    def close(self) -> None:
        self.ipr.close()

    # --- reading ----------------------------------------------------------------------------

    def _links(self) -> tuple:
        """The link dump; a dump interrupted by a concurrent change is a KernelError to retry."""
        try:
            return tuple(self.ipr.get_links())
        except NetlinkError as exc:
            raise KernelError("read links", str(exc)) from exc

    def links(self) -> Dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._links()}

    def bridged(self) -> FrozenSet[str]:
        """Names of bridges and of interfaces enslaved to a bridge."""
        links = self._links()
        kinds = {}
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            kinds[link["index"]] = info.get_attr("IFLA_INFO_KIND") if info else None
        return frozenset(link.get_attr("IFLA_IFNAME") for link in links
                         if kinds[link["index"]] == "bridge"
                         or kinds.get(link.get_attr("IFLA_MASTER")) == "bridge")

    def policy_routing(self) -> Dict[int, bool]:
        """Whether `ip rule` works per family (kernel CONFIG_IP{,V6}_MULTIPLE_TABLES)."""
        result = {}
        for version, af in AF.items():
            try:
                self.ipr.get_rules(family=af)
                result[version] = True
            except NetlinkError:
                result[version] = False
        return result

    def rules(self) -> FrozenSet[Rule]:
        found: List[Rule] = []
        for version, af in AF.items():
            try:
                messages = self.ipr.get_rules(family=af)
            except NetlinkError as exc:
                if version == 6:  # IPv6 without multiple tables: nothing of ours can exist there
                    continue
                raise KernelError("read rules", str(exc)) from exc
            found += [_rule(version, m) for m in messages]
        return frozenset(found)

    def routes(self, table: int) -> FrozenSet[Route]:
        names = self.links()
        found: List[Route] = []
        for version, af in AF.items():
            try:
                messages = self.ipr.get_routes(family=af, table=table)
            except NetlinkError as exc:
                raise KernelError(f"read routes of table {table}", str(exc)) from exc
            found += [_route(version, m, names) for m in messages
                      if (m.get_attr("RTA_TABLE") or m["table"]) == table]
        return frozenset(found)

    # --- writing ----------------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        self.writes += 1
        try:
            fn(*args, **kwargs)
        except NetlinkError as exc:
            raise KernelError(what, f"{exc.args[1] if len(exc.args) > 1 else exc} "
                                    f"(errno {exc.code})") from exc

    def add_rule(self, rule: Rule) -> None:
        self._call(f"add {rule}", self.ipr.rule, "add", **_rule_args(rule))

    def delete_rule(self, rule: Rule) -> None:
        self._call(f"delete {rule}", self.ipr.rule, "del", **_rule_args(rule))

    def add_route(self, route: Route, replace: bool = False) -> None:
        verb = "replace" if replace else "add"
        self._call(f"{verb} {route}", self.ipr.route, verb, **self._route_args(route))

    def delete_route(self, route: Route) -> None:
        self._call(f"delete {route}", self.ipr.route, "del", **self._route_args(route))

    def _route_args(self, route: Route) -> dict:
        index = [i for i, name in self.links().items() if name == route.dev]
        if not index:
            raise KernelError(f"{route}", f"no interface {route.dev}")
        args = dict(family=AF[route.family], dst=route.dst, table=route.table, type=route.type,
                    oif=index[0], proto=route.protocol)
        if route.metric:
            args["priority"] = route.metric
        if route.type == "local" and route.family == 4:
            args["scope"] = RT_SCOPE_HOST  # as `ip route add local` does; universe is EINVAL
        return args


def _rule_args(rule: Rule) -> dict:
    return dict(family=AF[rule.family], priority=rule.priority, table=rule.table,
                fwmark=rule.fwmark, fwmask=rule.fwmask, protocol=rule.protocol)


def _rule(version: int, m) -> Rule:
    other = []
    for attr, word in (("FRA_IIFNAME", "iif"), ("FRA_OIFNAME", "oif")):
        if m.get_attr(attr):
            other.append(f"{word} {m.get_attr(attr)}")
    for attr, length, word in (("FRA_SRC", "src_len", "from"), ("FRA_DST", "dst_len", "to")):
        if m.get_attr(attr):
            other.append(f"{word} {m.get_attr(attr)}/{m[length]}")
    if m["action"] != FR_ACT_TO_TBL:
        other.append(f"action {m['action']}")
    return Rule(family=version, priority=m.get_attr("FRA_PRIORITY") or 0,
                table=m.get_attr("FRA_TABLE") or m["table"],
                fwmark=m.get_attr("FRA_FWMARK") or 0, fwmask=m.get_attr("FRA_FWMASK") or 0,
                protocol=m.get_attr("FRA_PROTOCOL") or 0, other=" ".join(other))


def _route(version: int, m, names: Dict[int, str]) -> Route:
    zero = "0.0.0.0" if version == 4 else "::"
    oif = m.get_attr("RTA_OIF")
    return Route(family=version, table=m.get_attr("RTA_TABLE") or m["table"],
                 dst=f"{m.get_attr('RTA_DST') or zero}/{m['dst_len']}",
                 type=ROUTE_TYPES.get(m["type"], str(m["type"])),
                 dev=names.get(oif, str(oif)) if oif else "",
                 protocol=m["proto"], metric=m.get_attr("RTA_PRIORITY") or 0)
