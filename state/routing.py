"""Policy rules and routes, as the planner compares them: values, not netlink messages."""

from __future__ import annotations

from dataclasses import dataclass

FAMILY_NAME = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True, order=True)
class Rule:
    """An `ip rule`. `other` holds selectors we do not model (iif, from, ...) of foreign rules."""

    family: int  # 4 or 6
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    protocol: int = 0
    other: str = ""

    def __str__(self) -> str:
        sel = f"fwmark {self.fwmark:#x}/{self.fwmask:#x}" if self.fwmark or self.fwmask else "from all"
        extra = f" {self.other}" if self.other else ""
        return (f"rule {FAMILY_NAME[self.family]} {sel}{extra} lookup {self.table} "
                f"pref {self.priority} proto {self.protocol}")


@dataclass(frozen=True, order=True)
class Route:
    """A route in a table. (family, table, dst, metric) is the kernel's key for it."""

    family: int
    table: int
    dst: str  # CIDR
    type: str = "local"
    dev: str = "lo"
    protocol: int = 0
    metric: int = 0

    @property
    def key(self) -> tuple:
        return (self.family, self.table, self.dst, self.metric)

    def __str__(self) -> str:
        metric = f" metric {self.metric}" if self.metric else ""
        return (f"route {FAMILY_NAME[self.family]} {self.type} {self.dst} dev {self.dev} "
                f"table {self.table} proto {self.protocol}{metric}")
