"""The daemon's one view of each upstream from its workers' Health.status() reports: clocks
given by hand, no daemon."""

from __future__ import annotations

from tproxyd.reconciler.upstream_health import check_seconds, merge
from tproxyd.state.health import Health
from tproxyd.state.upstreams import SOCKS5, Upstream

WALL, MONO = 1_700_000_000.0, 500.0  # now, on each clock


def up(ago: float | None = None, ok: bool | None = None, latency: float | None = None,
       for_: float = 100.0) -> dict:
    return {"state": "up", "for": for_, "reason": "", "retry_in": None, "failures": {},
            "last_check_ago": ago, "last_check_ok": ok, "last_check_latency": latency}


def down(for_: float, reason: str, retry_in: float = 2.0, **kw) -> dict:
    return dict(up(**kw), state="down", **{"for": for_}, reason=reason, retry_in=retry_in)


def test_down_in_any_worker_is_down_since_the_earliest_with_its_reason():
    reports = [({"health": {"corp": up(ago=1.0, ok=True, latency=0.004)}}, MONO - 0.5),
               ({"health": {"corp": down(30.0, "refused", retry_in=4.0)}}, MONO - 1.0),
               ({"health": {"corp": down(10.0, "check: timeout", retry_in=1.5)}}, MONO)]
    reports[1][0]["health"]["corp"]["failures"] = {"refused": 2}
    (view,) = merge(["corp"], reports, WALL, MONO).values()
    assert view["state"] == "down" and view["reason"] == "refused"
    assert view["since"] == WALL - 1.0 - 30.0  # received 1 s ago, down for 30 s then
    assert view["retry_in"] == 1.5 and view["workers"] == 3 and view["down_in"] == 2
    assert view["failures"] == {"refused": 2}
    # the latest check is the first worker's (1.5 s ago), which passed
    assert view["last_check"] == WALL - 1.5 and view["last_check_ok"] is True
    assert view["last_check_seconds"] == 0.004
    assert check_seconds({"corp": view}) == {"corp": 0.004}


def test_up_everywhere_and_the_latest_check_wins_even_when_slower():
    reports = [({"health": {"a": up(ago=5.0, ok=True, latency=0.001)}}, MONO),
               ({"health": {"a": up(ago=0.2, ok=True, latency=0.250)}}, MONO)]
    view = merge(["a"], reports, WALL, MONO)["a"]
    assert view["state"] == "up" and view["down_in"] == 0 and view["reason"] == ""
    assert view["last_check_seconds"] == 0.250


def test_a_failed_latest_check_has_no_latency_gauge():
    reports = [({"health": {"a": up(ago=5.0, ok=True, latency=0.001)}}, MONO),
               ({"health": {"a": down(0.1, "check: connect", ago=0.1, ok=False)}}, MONO)]
    merged = merge(["a"], reports, WALL, MONO)
    assert merged["a"]["last_check_ok"] is False and merged["a"]["last_check_seconds"] is None
    assert check_seconds(merged) == {}


def test_only_upstreams_of_the_config_and_only_once_reported():
    reports = [({"health": {"gone": up(), "a": up()}}, MONO), ({"accepted": 3}, MONO)]
    assert set(merge(["a", "b"], reports, WALL, MONO)) == {"a"}
    assert merge(["a"], [], WALL, MONO) == {}


def test_it_reads_what_a_workers_health_reports():
    u = Upstream("corp", SOCKS5, "198.18.3.2", 1080, check_interval=10)
    h = Health([u], now=0.0)
    h["corp"].check_started(0.0)
    h["corp"].check_passed(0.02, 0.02)
    h.report("corp", 3.0, "failed", "refused", started=2.9)
    view = merge(["corp"], [({"health": h.status(4.0)}, MONO)], WALL, MONO)["corp"]
    assert view["state"] == "down" and view["reason"] == "refused"
    assert view["since"] == WALL - 1.0
    assert view["last_check"] == WALL - 3.98 and view["last_check_seconds"] == 0.02
