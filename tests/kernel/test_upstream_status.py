"""`tproxy status` shows each upstream as its workers see it (issue 12, "Status and counters"):
up with its last check and latency, "DOWN since <time> (reason)" when its proxy is killed, up
again when it is back; each route's matched connections. A real SOCKS5 upstream (microsocks)
in the gateway's namespace, checked every second, behind a daemon with two workers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from lab import WAN, Lab, wait_for_port
from tests.kernel.test_daemon import Tproxyd, config, eventually, serve_body

pytestmark = pytest.mark.kernel
UPSTREAM = """
[[upstream]]
name = "socks"
type = "socks5"
address = "127.0.0.1:1080"
check_interval = 1
connect_timeout = 2
[[route]]
name = "corp"
ports = [8080]
via = ["socks"]
"""
LINE = "upstream socks (socks5 127.0.0.1:1080): "


def microsocks(lab: Lab) -> subprocess.Popen:
    proc = lab.spawn(lab.gw, "microsocks", "-i", "127.0.0.1", "-p", "1080")
    wait_for_port(lab, lab.gw, 1080)
    return proc


def upstream_line(d: Tproxyd) -> str:
    out = d.tproxy("status").stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith(LINE)] or [""]
    return line[len(LINE):]


def upstream_json(d: Tproxyd) -> dict:
    out = d.tproxy("status", "--json")
    return (json.loads(out.stdout)["daemon"] or {}).get("upstreams", {}).get("socks", {})


def fetch(lab: Lab) -> int:
    return lab.run(lab.client, "curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                   f"http://{WAN.peer4}:8080/body", check=False).returncode


def test_an_upstream_killed_shows_down_since_when_and_why_then_up_again(lab: Lab):
    if not shutil.which("microsocks"):
        pytest.skip("microsocks is not installed (sh .ci/setup installs it)")
    serve_body(lab, 1000)
    proxy = microsocks(lab)
    d = Tproxyd(lab, config(lab, extra="[relay]\nworkers = 2\n") + UPSTREAM)
    assert fetch(lab) == 0
    up = eventually(lambda: (ln := upstream_line(d)).startswith("up; last check") and ln,
                    "socks up with a check", timeout=10)
    assert re.match(r"up; last check \d+s ago ok \(\d+\.\d ms\); ", up), up
    assert "1 connections" in up
    assert "route corp: 1 connections -> socks" in d.tproxy("status").stdout
    h = upstream_json(d)
    assert h["state"] == "up" and h["last_check_ok"] is True and h["workers"] == 2
    assert 0 < h["last_check_seconds"] < 1

    lab.stop(proxy)
    down = eventually(lambda: (ln := upstream_line(d)).startswith("DOWN") and ln,
                      "socks down", timeout=10)
    assert re.match(r"DOWN since \d\d:\d\d:\d\d \(check: connect\)", down), down
    assert "last check" in down and "ago failed" in down
    h = upstream_json(d)
    assert h["state"] == "down" and h["reason"] == "check: connect"
    assert h["last_check_ok"] is False and h["last_check_seconds"] is None
    assert fetch(lab) != 0  # its only upstream is down: reset

    microsocks(lab)
    # two passed checks in a row in every worker bring it back (no flapping)
    back = eventually(lambda: (ln := upstream_line(d)).startswith("up;") and ln,
                      "socks up again", timeout=20)
    assert re.match(r"up; last check \d+s ago ok \(\d+\.\d ms\); ", back), back
    assert fetch(lab) == 0
    assert upstream_json(d)["state"] == "up"
