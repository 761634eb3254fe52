"""`tproxy check --config-only` needs no root: exit codes and messages as a person sees them."""

from __future__ import annotations

import json
import os

import pytest

from tproxyd.reconciler.cli import main

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "tproxy.toml.example")


def test_check_example(capsys):
    assert main(["check", "--config-only", "-c", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{EXAMPLE}: valid")
    assert "intercept lan: tcp/udp entering lan0" in out


def test_check_refuses_with_key_paths(tmp_path, capsys):
    bad = tmp_path / "t.toml"
    bad.write_text('[[intercept]]\ninterfaces = ["lan0"]\nports = [1, 2, 70000]\n')
    assert main(["check", "--config-only", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: intercept[0].ports[2]: 70000 is out of range 1..65535" in err


def test_check_json_errors(tmp_path, capsys):
    bad = tmp_path / "t.toml"
    bad.write_text("[relay]\nport = [\n")
    assert main(["check", "--config-only", "--json", "-c", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    (error,) = report["errors"]
    assert error["line"] == 3 and "TOML syntax" in error["message"]


def test_missing_config(tmp_path, capsys):
    assert main(["plan", "-c", str(tmp_path / "nope.toml")]) == 1
    assert "nope.toml: cannot read" in capsys.readouterr().err


def test_an_untrusted_state_dir_is_named_not_blamed_on_privileges(tmp_path, capsys, monkeypatch):
    from tproxyd.reconciler import cli, statefiles

    def refused(config, args):
        raise statefiles.UntrustedError(str(tmp_path), "writable by group or others (mode 0775)")

    monkeypatch.setitem(cli.COMMANDS, "down", (refused, ""))
    assert main(["down", "-c", EXAMPLE]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "mode 0775" in err and "run as root" not in err


def test_daemon_lines_say_which_worker_does_not_answer():
    from tproxyd.reconciler.cli import _daemon_lines

    view = {"pid": 7, "started": 0.0, "reconciles": 1, "last_reconcile": {}, "config_error": None,
            "workers": [{"slot": 0, "pid": 11, "uptime": 9.0, "state": "serving", "restarts": 0,
                         "counters_age": 0.4},
                        {"slot": 1, "pid": 12, "uptime": 9.0, "state": "serving", "restarts": 0,
                         "counters_age": 8.2}],
            "crash_loop": [], "last_exits": {}, "counters": {"accepted": 3}}
    lines = _daemon_lines("/run/tproxyd/tproxyd.sock", view)
    assert lines[1] == "worker 0: pid 11, up 9.0s, serving, 0 restarts"
    assert lines[2] == "worker 1: pid 12, up 9.0s, serving, 0 restarts, not answering (counters from 8s ago)"


UPSTREAMS = '''[[intercept]]
name = "lan"
interfaces = ["lan0"]
destinations = ["0.0.0.0/0"]
[[upstream]]
name = "corp"
type = "socks5"
address = "198.18.3.2:1080"
[[upstream]]
name = "web"
type = "http"
address = "[2001:db8:3::2]:3128"
check_interval = 0
[[route]]
name = "office"
ports = [443]
via = ["corp", "web"]
[[route]]
name = "ads"
destinations = ["198.18.9.0/24"]
via = "reject"
'''


def test_check_prints_the_upstreams_and_routes(tmp_path, capsys):
    config = tmp_path / "t.toml"
    config.write_text(UPSTREAMS)
    assert main(["check", "--config-only", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "upstream corp: socks5 198.18.3.2:1080, check every 10 s" in out
    assert "upstream web: http [2001:db8:3::2]:3128, passive checks only" in out
    assert "route office: tcp ports 443 -> corp, web" in out
    assert "route ads: tcp/udp to 1 destinations -> reject" in out


def test_status_shows_each_upstreams_state_since_when_and_why_and_its_last_check():
    import time as clock

    from tproxyd.reconciler.cli import _upstream_lines
    from tproxyd.state.loader import from_bytes

    config = from_bytes(UPSTREAMS.encode(), "t.toml")
    now = clock.mktime((2026, 12, 2, 15, 30, 0, 0, 0, -1))
    view = {"workers": [{}, {}], "counters": {
        "upstream_corp_up": 2, "upstream_corp_connections": 5, "upstream_corp_checks": 4,
        "upstream_web_up": 1, "upstream_web_failures": 3, "route_office_connections": 6},
        "upstreams": {
            "corp": {"state": "up", "since": now - 60, "reason": "", "retry_in": None,
                     "workers": 2, "down_in": 0, "last_check": now - 2.2, "last_check_ok": True,
                     "last_check_seconds": 0.0041, "failures": {}},
            "web": {"state": "down", "since": now - 125, "reason": "refused", "retry_in": 3.6,
                    "workers": 2, "down_in": 1, "last_check": None, "last_check_ok": None,
                    "last_check_seconds": None, "failures": {"refused": 3}}}}
    lines = _upstream_lines(config, view, now=now)
    assert lines[0] == ("upstream corp (socks5 198.18.3.2:1080): up; last check 2s ago ok "
                        "(4.1 ms); 0 active, 5 connections, 0 failures, 0 declined, 0 of 4 "
                        "checks failed")
    assert lines[1].startswith("upstream web (http [2001:db8:3::2]:3128): DOWN since 15:27:55 "
                               "(refused) in 1 of 2 workers, next try in 4s; no active checks; ")
    assert lines[2] == "route office: 6 connections -> corp, web"
    view["upstreams"]["corp"].update(state="down", since=now - 2 * 86400, reason="check: connect",
                                     down_in=2, last_check_ok=False, last_check_seconds=None)
    text = _upstream_lines(config, view, now=now)[0]
    assert ": DOWN since 2026-11-30 15:30:00 (check: connect), next try in" not in text
    assert ": DOWN since 2026-11-30 15:30:00 (check: connect); last check 2s ago failed;" in text
    view["upstreams"]["corp"]["last_check"] = None
    assert "): DOWN since 2026-11-30 15:30:00 (check: connect); not checked yet; " in \
        _upstream_lines(config, view, now=now)[0]


def test_status_shows_upstream_health_from_the_workers_counters(tmp_path):
    from tproxyd.reconciler.cli import _upstream_lines
    from tproxyd.state.loader import from_bytes

    config = from_bytes(UPSTREAMS.encode(), "t.toml")
    view = {"workers": [{}, {}], "counters": {
        "upstream_corp_up": 2, "upstream_corp_connections": 5, "upstream_corp_failures": 1,
        "upstream_corp_active": 1, "upstream_corp_checks": 4, "upstream_corp_checks_failed": 0,
        "upstream_web_up": 0, "upstream_web_failures": 3, "route_office_connections": 6,
        "route_ads_connections": 2}}
    lines = _upstream_lines(config, view)
    assert lines[0] == ("upstream corp (socks5 198.18.3.2:1080): up; 1 active, 5 connections, "
                        "1 failures, 0 declined, 0 of 4 checks failed")
    assert lines[1].startswith("upstream web (http [2001:db8:3::2]:3128): DOWN; ")
    assert lines[2:] == ["route office: 6 connections -> corp, web",
                         "route ads: 2 connections -> reject"]
    view["counters"]["upstream_corp_up"] = 1
    assert ": up in 1 of 2 workers;" in _upstream_lines(config, view)[0]


@pytest.mark.parametrize("metrics, line", [
    ({"listen": "127.0.0.1:9641", "error": None}, "metrics: http://127.0.0.1:9641/metrics"),
    ({"listen": "[::1]:9641", "error": "cannot listen on [::1]:9641: Address already in use"},
     "metrics: NOT SERVED: cannot listen on [::1]:9641: Address already in use (tried again every "
     "resync_interval)"),
    ({"listen": None, "error": None}, None),
])
def test_daemon_lines_say_where_metrics_are_served_or_why_not(metrics, line):
    from tproxyd.reconciler.cli import _daemon_lines

    view = {"pid": 7, "started": 0.0, "reconciles": 1, "last_reconcile": {}, "config_error": None,
            "workers": [], "crash_loop": [], "last_exits": {}, "counters": {}, "metrics": metrics}
    lines = _daemon_lines("/run/tproxyd/tproxyd.sock", view)
    assert [ln for ln in lines if ln.startswith("metrics")] == ([line] if line else [])
