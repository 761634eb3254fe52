"""`tproxy top`'s screen and its answers to a daemon that is missing or too old."""

from __future__ import annotations

import json

from tproxyd.reconciler import cli, daemon

DOC = {"time": 0.0, "workers": 2, "open": 3, "udp_sessions": 1, "bytes_up": 1500,
       "bytes_down": 2_500_000, "rate": 1_200_000, "cost_ms": 1.0, "connections": [
           {"client": "10.0.1.2:40000", "dst": "198.18.2.1:443", "domain": "example.com",
            "route": "direct", "via": "direct", "state": "relaying", "age": 12.3,
            "bytes_up": 700, "bytes_down": 2_400_000, "rate_up": 10, "rate_down": 1_100_000,
            "worker": 7, "proto": "tcp"},
           {"proto": "udp", "client": "10.0.1.3:5353", "dst": "198.18.2.53:53", "domain": None,
            "route": "dns", "via": "corp", "state": "relaying", "age": 3.0, "bytes_up": 80,
            "bytes_down": 400, "rate_up": 8, "rate_down": 40, "worker": 7}]}


def test_the_screen_has_totals_then_a_line_per_connection():
    head, _, columns, line, udp = cli._top_lines(DOC, rows=10)
    assert "3 connections open (2 workers)" in head and "1.5K up" in head
    assert "2.5M down" in head and "now 1.2M/s" in head and "1 UDP sessions" in head
    assert columns.split()[:3] == ["PROTO", "CLIENT", "DESTINATION"]
    assert line.split()[:2] == ["tcp", "10.0.1.2:40000"]
    assert "198.18.2.1:443 (example.com)" in line and "1.1M/s" in line and "12s" in line
    assert udp.split()[:5] == ["udp", "10.0.1.3:5353", "198.18.2.53:53", "dns", "corp"]
    assert udp.split()[-2:] == ["8B/s", "40B/s"]


def test_once_json_prints_the_daemons_document(monkeypatch, capsys):
    monkeypatch.setattr(daemon, "query", lambda path, kind="status": DOC if kind == "top" else {})
    assert cli.main(["top", "--once", "--json", "-c", "tproxy.toml.example"]) == 0
    assert json.loads(capsys.readouterr().out) == DOC


def test_an_older_daemon_answering_status_is_named(monkeypatch, capsys):
    monkeypatch.setattr(daemon, "query", lambda path, kind="status": {"pid": 1})
    assert cli.main(["top", "--once", "-c", "tproxy.toml.example"]) == 1
    assert "older tproxyd" in capsys.readouterr().err


def test_no_daemon_is_an_error(monkeypatch, capsys):
    def refused(path, kind="status"):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(daemon, "query", refused)
    assert cli.main(["top", "--once", "-c", "tproxy.toml.example"]) == 1
    assert "no daemon answers" in capsys.readouterr().err
