"""What the daemon exposes to Prometheus ([metrics] listen): a custom Collector over a snapshot.

The daemon's loop builds a Snapshot from what it already holds (the workers' summed counters,
which never go down: supervisor.py; its own reconcile counts) and the collector only maps it
to metric families: no I/O, no waiting, nothing shared with another thread.

Worker counters reach metrics through WORKER_COUNTERS, a table from the name a worker reports
to a metric and its labels. A name a worker does not report (an older relay) counts 0, so every
series in the table exists from the first scrape. Connections by path and bytes by via come from
the relay's labelled counters (`connections|proto|route|via|end`, `bytes|direction|via`,
relay/loop.py), parsed by labelled(). Label values come from these tables and from the config
(route and upstream names, "direct", "reject"), never from traffic: the number of series is
bounded. A route or upstream renamed by a reload keeps its series (the totals of the workers
that counted under the old name stay in the daemon, and a counter may not vanish mid-life).
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Dict, List, Tuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from tproxyd.relay.ends import End
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
)

# How a TCP connection or UDP session ended: the access log's `end` values (issue 14), and the
# suffixes of the relay's end_tcp_<end> / end_udp_<end> counters.
ENDS = tuple(end.value for end in End)
DIRECT = "direct"  # route and via labels of traffic no route matched

Labels = Tuple[Tuple[str, str], ...]

# metric name (without tproxyd_ and _total) -> (type, help, label names)
FAMILIES: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "connections": ("counter", "TCP connections and UDP sessions that ended, by how they ended",
                    ("proto", "route", "via", "end")),
    "active_connections": ("gauge", "TCP connections and UDP sessions open now", ("proto",)),
    "bytes": ("counter", "Payload bytes relayed, TCP and UDP (up: client to server)",
              ("direction", "via")),
    "udp_datagrams": ("counter", "UDP datagrams relayed (up: client to server)", ("direction",)),
    "drops": ("counter", "Things the relay dropped rather than stall, by reason", ("reason",)),
}


def _worker_counters() -> Dict[str, Tuple[str, Labels]]:
    table: Dict[str, Tuple[str, Labels]] = {}
    for direction in ("up", "down"):
        table[f"udp_datagrams_{direction}"] = ("udp_datagrams", (("direction", direction),))
    table.update({
        "active": ("active_connections", (("proto", "tcp"),)),
        "udp_sessions": ("active_connections", (("proto", "udp"),)),
        "udp_drops": ("drops", (("reason", "udp_relay"),)),  # full buffers, no session
        "udp_kernel_drops": ("drops", (("reason", "udp_receive_queue"),)),
        "udp_failed": ("drops", (("reason", "udp_no_socket"),)),  # a session's socket failed
        "log_suppressed": ("drops", (("reason", "log_line"),)),
        "access_log_dropped": ("drops", (("reason", "access_log_line"),)),
    })
    return table


# worker counter name -> (family, labels); several names may feed one series (they are summed)
WORKER_COUNTERS = _worker_counters()
PROTOS, DIRECTIONS = ("tcp", "udp"), ("up", "down")
# series shown from the first scrape, before any traffic: every end of direct traffic
ALWAYS = tuple(
    [("connections", (("proto", p), ("route", DIRECT), ("via", DIRECT), ("end", e)))
     for p in PROTOS for e in ENDS]
    + [("bytes", (("direction", d), ("via", DIRECT))) for d in DIRECTIONS])


def labelled(key: str) -> Tuple[str, Labels] | None:
    """The series of a relay's labelled counter (relay/loop.py PATH_KEY, VIA_BYTES_KEY), None
    for any other key or one whose values are not what the relay writes. TCP's and UDP's
    payload bytes go to the same series: bytes_total has no proto label."""
    parts = key.split("|")
    if parts[0] == "connections" and len(parts) == 5:
        _, proto, route, via, end = parts
        if proto in PROTOS and end in ENDS and route and via:
            return "connections", (("proto", proto), ("route", route), ("via", via), ("end", end))
    elif parts[0] == "bytes" and len(parts) == 3:
        _, direction, via = parts
        if direction in DIRECTIONS and via:
            return "bytes", (("direction", direction), ("via", via))
    return None

RECONCILE_RESULTS = ("ok", "error")
DRIFT_KINDS = ("rule", "route", "nft_table", "nft_set", "sysctl")
REPAIR_KIND = {AddRule: "rule", DeleteRule: "rule", AddRoute: "route", ReplaceRoute: "route",
               DeleteRoute: "route", ReplaceNftTable: "nft_table", DeleteNftTable: "nft_table",
               UpdateNftSet: "nft_set", SetSysctl: "sysctl"}
# reconciles take milliseconds when nothing changed and seconds when 100,000 ranges load
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """Counts of observations per bucket (not cumulative), their sum and count."""

    bounds: Tuple[float, ...] = RECONCILE_BUCKETS
    counts: List[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)  # the last: above every bound

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> List[Tuple[str, float]]:
        """Prometheus' cumulative buckets, ending with +Inf."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((floatToGoString(bound), total))
        return out


def repairs(ops: Iterable[Op]) -> Dict[str, int]:
    """Changes by kind (DRIFT_KINDS)."""
    out: Dict[str, int] = {}
    for op in ops:
        kind = REPAIR_KIND[type(op)]
        out[kind] = out.get(kind, 0) + 1
    return out


@dataclass
class DaemonCounts:
    """The daemon's own counters, kept by its loop."""

    reconciles: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECONCILE_RESULTS, 0))
    reconcile_seconds: Histogram = field(default_factory=Histogram)
    drift_repairs: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_KINDS, 0))

    def reconciled(self, result: str, seconds: float,
                   repairs: Mapping[str, int] | None = None) -> None:
        """One reconcile ended with result after seconds; repairs: changes made to undo drift
        (not to follow a new config), by kind."""
        self.reconciles[result] = self.reconciles.get(result, 0) + 1
        self.reconcile_seconds.observe(seconds)
        for kind, n in (repairs or {}).items():
            self.drift_repairs[kind] = self.drift_repairs.get(kind, 0) + n


@dataclass(frozen=True)
class Snapshot:
    """Everything a scrape shows, as the daemon's loop holds it at one moment."""

    counters: Mapping[str, int]  # the workers' summed counters (Supervisor.counters())
    daemon: DaemonCounts
    upstreams: Tuple[str, ...] = ()  # names from the config in force
    config_valid: bool = True
    config_last_good: float = 0.0  # Unix time the config in force was loaded
    worker_restarts: int = 0
    # per upstream, from the relay once it reports them: up (0/1), seconds of the last check,
    # and failures by reason
    upstream_up: Mapping[str, float] = field(default_factory=dict)
    upstream_check_seconds: Mapping[str, float] = field(default_factory=dict)
    upstream_failures: Mapping[Tuple[str, str], int] = field(default_factory=dict)


# the relay's per-upstream counters (upstream_<name>_<suffix>) -> failure reason
FAILURE_COUNTERS = {"failures": "failed", "declined": "declined", "checks_failed": "check"}


def upstream_series(counters: Mapping[str, int], upstreams: Tuple[str, ...], workers: int
                    ) -> Tuple[Dict[str, float], Dict[Tuple[str, str], int]]:
    """tproxyd_upstream_up and _failures_total from the workers' summed counters: an upstream
    is up (1) when every live worker has it up (each worker judges it on its own, and one
    that has it down fails its connections over); failures by reason."""
    up: Dict[str, float] = {}
    failures: Dict[Tuple[str, str], int] = {}
    for name in upstreams:
        if workers:
            up[name] = 1.0 if counters.get(f"upstream_{name}_up", 0) >= workers else 0.0
        for suffix, reason in FAILURE_COUNTERS.items():
            failures[(name, reason)] = counters.get(f"upstream_{name}_{suffix}", 0)
    return up, failures


def build_info() -> Tuple[str, str]:
    try:
        version = metadata.version("tproxyd")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        version = "unknown"
    return version, platform.python_version()


def families(snap: Snapshot, info: Tuple[str, str] | None = None) -> List[Metric]:
    """The metric families of one snapshot: a pure function, so unit tests need no daemon."""
    out: Dict[str, Metric] = {}
    values: Dict[Tuple[str, Labels], float] = {}
    for name, (kind, doc, labels) in FAMILIES.items():
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        out[name] = cls(f"tproxyd_{name}", doc, labels=labels)
    for series in ALWAYS:
        values[series] = 0
    for key, series in WORKER_COUNTERS.items():
        values[series] = values.get(series, 0) + snap.counters.get(key, 0)
    for key, n in snap.counters.items():
        if "|" in key and (series := labelled(key)) is not None:
            values[series] = values.get(series, 0) + n
    for (name, labels), value in values.items():
        out[name].add_metric([v for _, v in labels], value)
    result = list(out.values())

    up = GaugeMetricFamily("tproxyd_upstream_up", "1 when the upstream passed its last check",
                           labels=("upstream",))
    checked = GaugeMetricFamily("tproxyd_upstream_check_seconds",
                                "How long the upstream's last check took", labels=("upstream",))
    failures = CounterMetricFamily("tproxyd_upstream_failures",
                                   "Failed connections through or checks of the upstream",
                                   labels=("upstream", "reason"))
    for name in snap.upstreams:  # only upstreams of the config in force: bounded
        if name in snap.upstream_up:
            up.add_metric([name], snap.upstream_up[name])
        if name in snap.upstream_check_seconds:
            checked.add_metric([name], snap.upstream_check_seconds[name])
    for (name, reason), n in sorted(snap.upstream_failures.items()):
        if name in snap.upstreams:
            failures.add_metric([name, reason], n)
    result += [up, failures, checked]

    reconciles = CounterMetricFamily("tproxyd_reconciles", "Reconciles of the kernel's state to "
                                     "the config, by result", labels=("result",))
    for result_name, n in snap.daemon.reconciles.items():
        reconciles.add_metric([result_name], n)
    hist = snap.daemon.reconcile_seconds
    duration = HistogramMetricFamily("tproxyd_reconcile_duration_seconds",
                                     "How long a reconcile took (read, plan, apply, read back)",
                                     buckets=hist.buckets(), sum_value=hist.sum)
    repairs = CounterMetricFamily("tproxyd_drift_repairs", "Changes made to undo a change "
                                  "someone else made to tproxyd's objects, by kind",
                                  labels=("kind",))
    for kind, n in snap.daemon.drift_repairs.items():
        repairs.add_metric([kind], n)
    version, python = info or build_info()
    result += [
        reconciles, duration, repairs,
        GaugeMetricFamily("tproxyd_config_valid", "1 when the config file was valid when last "
                          "read; 0 while the last good config stays in force despite an error",
                          value=1 if snap.config_valid else 0),
        GaugeMetricFamily("tproxyd_config_last_good_timestamp_seconds",
                          "Unix time the config in force was loaded", value=snap.config_last_good),
        CounterMetricFamily("tproxyd_worker_restarts", "Relay workers restarted after they died",
                            value=snap.worker_restarts),
        GaugeMetricFamily("tproxyd_build_info", "tproxyd's version and Python's, as labels",
                          labels=("version", "python")),
    ]
    result[-1].add_metric([version, python], 1)
    return result


class TproxydCollector(Collector):
    """Collects from the snapshot its callable returns at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot
        self.info = build_info()  # reads package metadata: once, not per scrape

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot(), self.info)


def registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own: none of prometheus_client's default process collectors, whose
    values would describe the daemon alone and whose reads of /proc cost every scrape."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TproxydCollector(snapshot))
    return reg
