"""The collector's mapping from the workers' counters and the daemon's own to Prometheus
series, checked by parsing what prometheus_client renders (no daemon, no root)."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from tproxyd.reconciler.metrics import (
    ENDS,
    WORKER_COUNTERS,
    DaemonCounts,
    Histogram,
    Snapshot,
    families,
    registry,
)

INFO = ("9.9", "3.11.2")


def samples(snap: Snapshot) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, as a scraper reads the 0.0.4 text."""
    text = generate_latest(registry(lambda: snap)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def conn(proto: str, end: str) -> tuple:
    return ("tproxyd_connections_total",
            (("end", end), ("proto", proto), ("route", "direct"), ("via", "direct")))


def test_every_end_of_tcp_and_udp_is_a_series_from_the_first_scrape():
    got = samples(Snapshot({}, DaemonCounts()))
    for proto in ("tcp", "udp"):
        for end in ENDS:
            assert got[conn(proto, end)] == 0
    assert len(ENDS) == 16


def test_worker_counters_reach_their_series():
    counters = {"connections|tcp|direct|direct|client_fin": 3,
                "connections|tcp|direct|direct|server_reset": 1,
                "connections|udp|direct|direct|udp_expired": 4,
                "connections|tcp|direct|direct|over_limit": 2, "active": 5, "udp_sessions": 6,
                "bytes|up|direct": 107, "bytes|down|direct": 1070,
                "udp_datagrams_up": 8, "udp_datagrams_down": 9, "udp_drops": 10,
                "udp_kernel_drops": 11, "udp_failed": 12, "log_suppressed": 13,
                "access_log_dropped": 14, "accepted": 99, "started": 1,  # not in the table
                "end_tcp_client_fin": 3, "bytes_up": 107}  # flat totals: not shown twice
    got = samples(Snapshot(counters, DaemonCounts()))
    assert got[conn("tcp", "client_fin")] == 3
    assert got[conn("tcp", "server_reset")] == 1
    assert got[conn("tcp", "over_limit")] == 2
    assert got[conn("udp", "udp_expired")] == 4
    assert got[("tproxyd_active_connections", (("proto", "tcp"),))] == 5
    assert got[("tproxyd_active_connections", (("proto", "udp"),))] == 6
    assert got[("tproxyd_bytes_total", (("direction", "up"), ("via", "direct")))] == 107
    assert got[("tproxyd_bytes_total", (("direction", "down"), ("via", "direct")))] == 1070
    assert got[("tproxyd_udp_datagrams_total", (("direction", "up"),))] == 8
    assert got[("tproxyd_udp_datagrams_total", (("direction", "down"),))] == 9
    drops = {dict(labels)["reason"]: v for (name, labels), v in got.items()
             if name == "tproxyd_drops_total"}
    assert drops == {"udp_relay": 10, "udp_receive_queue": 11, "udp_no_socket": 12, "log_line": 13,
                     "access_log_line": 14}
    assert not any("accepted" in name or "started" in name for name, _ in got)


def test_connections_and_bytes_by_route_and_via():
    counters = {"connections|tcp|corp|a|client_fin": 2, "connections|tcp|corp|b|client_fin": 1,
                "connections|udp|corp|a|udp_expired": 5, "connections|tcp|ads|reject|rejected": 7,
                "bytes|up|a": 40, "bytes|down|a": 400, "bytes|up|b": 1, "bytes|down|b": 2,
                # not what a relay writes: left out rather than shown as a new label value
                "connections|tcp|corp|a|exploded": 1, "connections|sctp|x|y|client_fin": 1,
                "connections|tcp||direct|client_fin": 1, "bytes|sideways|a": 1, "bytes|up": 3}
    got = samples(Snapshot(counters, DaemonCounts()))

    def path(proto: str, route: str, via: str, end: str) -> float:
        return got[("tproxyd_connections_total",
                    (("end", end), ("proto", proto), ("route", route), ("via", via)))]

    assert path("tcp", "corp", "a", "client_fin") == 2
    assert path("tcp", "corp", "b", "client_fin") == 1
    assert path("udp", "corp", "a", "udp_expired") == 5
    assert path("tcp", "ads", "reject", "rejected") == 7
    assert path("tcp", "direct", "direct", "client_fin") == 0  # always there
    assert got[("tproxyd_bytes_total", (("direction", "up"), ("via", "a")))] == 40
    assert got[("tproxyd_bytes_total", (("direction", "down"), ("via", "b")))] == 2
    conns = [dict(labels) for name, labels in got if name == "tproxyd_connections_total"]
    assert len(conns) == 2 * len(ENDS) + 4
    assert {c["end"] for c in conns} == set(ENDS) and {c["proto"] for c in conns} == {"tcp", "udp"}
    assert {c["route"] for c in conns} == {"direct", "corp", "ads"}
    assert {c["via"] for c in conns} == {"direct", "a", "b", "reject"}
    vias = {dict(labels)["via"] for name, labels in got if name == "tproxyd_bytes_total"}
    assert vias == {"direct", "a", "b"}


def test_the_table_names_what_a_worker_reports():
    """Every worker counter in the table is in a relay's stats reply: a renamed counter would
    otherwise read 0 for ever."""
    from tproxyd.relay.loop import Relay, Settings

    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False))
    try:
        reported = set(relay.stats())
    finally:
        relay.close()
    assert set(WORKER_COUNTERS) <= reported, sorted(set(WORKER_COUNTERS) - reported)
    assert {f"end_{p}_{e}" for p in ("tcp", "udp") for e in ENDS} <= reported
    assert ENDS == ("client_fin", "server_fin", "client_reset", "server_reset", "idle_timeout",
                    "connect_timeout", "connect_refused", "unreachable", "upstream_error",
                    "rejected", "over_limit", "loop", "drained", "udp_expired", "udp_evicted",
                    "udp_icmp")  # the access log's names (issue 14)


def test_the_table_maps_each_worker_counter_to_a_known_family_and_labels():
    for key, (family, labels) in WORKER_COUNTERS.items():
        assert family in ("connections", "active_connections", "bytes", "udp_datagrams",
                          "drops"), key
        assert all(value and " " not in value for _, value in labels), key


def test_upstreams_only_from_the_config_and_only_once_reported():
    snap = Snapshot({}, DaemonCounts(), upstreams=("a", "b"), upstream_up={"a": 1, "gone": 1},
                    upstream_check_seconds={"a": 0.05},
                    upstream_failures={("a", "refused"): 2, ("gone", "refused"): 9})
    got = samples(snap)
    assert got[("tproxyd_upstream_up", (("upstream", "a"),))] == 1
    assert got[("tproxyd_upstream_check_seconds", (("upstream", "a"),))] == 0.05
    assert got[("tproxyd_upstream_failures_total", (("reason", "refused"), ("upstream", "a")))] == 2
    upstreams = {dict(labels).get("upstream") for _, labels in got} - {None}
    assert upstreams == {"a"}  # b not reported yet; "gone" is in no config


def test_daemon_counters_histogram_and_config_state():
    d = DaemonCounts()
    d.reconciled("ok", 0.003)
    d.reconciled("ok", 0.2, {"rule": 1, "nft_table": 1})
    d.reconciled("error", 40.0)
    snap = Snapshot({}, d, config_valid=False, config_last_good=1_700_000_000.5,
                    worker_restarts=3)
    got = samples(snap)
    assert got[("tproxyd_reconciles_total", (("result", "ok"),))] == 2
    assert got[("tproxyd_reconciles_total", (("result", "error"),))] == 1
    bucket = "tproxyd_reconcile_duration_seconds_bucket"
    assert got[(bucket, (("le", "0.005"),))] == 1
    assert got[(bucket, (("le", "0.25"),))] == 2
    assert got[(bucket, (("le", "30.0"),))] == 2
    assert got[(bucket, (("le", "+Inf"),))] == 3
    assert got[("tproxyd_reconcile_duration_seconds_count", ())] == 3
    assert got[("tproxyd_reconcile_duration_seconds_sum", ())] == pytest.approx(40.203)
    assert got[("tproxyd_drift_repairs_total", (("kind", "rule"),))] == 1
    assert got[("tproxyd_drift_repairs_total", (("kind", "nft_table"),))] == 1
    assert got[("tproxyd_drift_repairs_total", (("kind", "sysctl"),))] == 0
    assert got[("tproxyd_config_valid", ())] == 0
    assert got[("tproxyd_config_last_good_timestamp_seconds", ())] == 1_700_000_000.5
    assert got[("tproxyd_worker_restarts_total", ())] == 3


def test_build_info():
    names = {m.name: m for m in families(Snapshot({}, DaemonCounts()), INFO)}
    (sample,) = names["tproxyd_build_info"].samples
    assert sample.labels == {"version": "9.9", "python": "3.11.2"} and sample.value == 1


def test_a_histogram_bound_is_inclusive():
    h = Histogram(bounds=(1.0, 2.0))
    for v in (1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.buckets() == [("1.0", 1), ("2.0", 3), ("+Inf", 4)]


def test_openmetrics_when_asked_for_and_it_parses():
    reg = registry(lambda: Snapshot({"connections|tcp|direct|direct|client_fin": 2},
                                    DaemonCounts()))
    encoder, content_type = choose_encoder("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = encoder(reg).decode()
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in parse_om(text)}
    assert fams["tproxyd_connections"].type == "counter"
    assert any(s.value == 2 for s in fams["tproxyd_connections"].samples)
    _, plain = choose_encoder("text/plain")
    assert plain.startswith("text/plain; version=0.0.4")


def test_upstream_up_and_failures_come_from_the_workers_counters():
    from tproxyd.reconciler.metrics import upstream_series

    counters = {"upstream_corp_up": 2, "upstream_corp_failures": 3, "upstream_corp_checks_failed": 1,
                "upstream_backup_up": 1, "upstream_backup_declined": 4}
    up, failures = upstream_series(counters, ("corp", "backup"), workers=2)
    assert up == {"corp": 1.0, "backup": 0.0}  # one of two workers has backup down
    assert failures[("corp", "failed")] == 3 and failures[("corp", "check")] == 1
    assert failures[("backup", "declined")] == 4 and failures[("backup", "failed")] == 0
    assert upstream_series(counters, ("corp",), workers=0)[0] == {}  # no worker: unknown
