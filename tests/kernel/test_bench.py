"""The benchmark harness itself, on tiny sizes: it builds its lab, runs every scenario, writes
valid JSON lines, and removes everything. No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab import run_own_lab

pytestmark = pytest.mark.kernel


def test_quick_bench_runs_every_scenario_and_cleans_up(lab, tmp_path):  # lab: root and tools
    out = tmp_path / "bench.jsonl"
    result, left = run_own_lab([sys.executable, "-m", "bench", "--quick", "--out", str(out)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = "\n".join(ln for ln in result.stderr.splitlines() if " failed: " in ln
                       or "did not" in ln)[-3000:]
    assert {r["scenario"] for r in rows} == {"throughput", "connections", "latency", "udp",
                                             "memory", "control", "syscalls"}
    # strace counted each proxy's syscalls; a connection costs a proxy more than a handful
    traced = {r["variant"]: r for r in rows if r["scenario"] == "syscalls"}
    assert set(traced) == {"tproxyd", "haproxy"}, failed
    assert all(r["value"] > 5 and "close" in r["syscalls_per_conn"] for r in traced.values())
    # CPU per connection, user and system apart, for each proxy's connection-rate runs
    assert all(r["relay_user_s"] > 0 and r["relay_sys_s"] > 0 and r["ops"] > 0 for r in rows
               if r["scenario"] == "connections" and r["variant"] in ("tproxyd", "haproxy"))
    assert "pinned: the proxy on CPU 0" in result.stdout and "user us/op" in result.stdout
    assert {r["variant"] for r in rows if r["scenario"] == "udp"} == {"kernel", "tproxyd"}
    assert all(r["relay_bytes"] >= 0.9 * r["bytes"] for r in rows
               if r["scenario"] == "udp" and r["variant"] == "tproxyd")
    assert all({"case", "variant", "value", "unit", "run"} <= r.keys() for r in rows)
    proxies = {"tproxyd", "tproxyd-2w", "haproxy", "haproxy-splice"}
    for scenario in ("throughput", "connections", "latency"):
        variants = {r["variant"] for r in rows if r["scenario"] == scenario}
        assert {"kernel", "tproxyd", "haproxy", "haproxy-splice"} <= variants <= {"kernel", *proxies}, failed
    assert "tproxyd-2w" in {r["variant"] for r in rows if r["scenario"] == "connections"}, failed
    assert all(r["relay_bytes"] >= 0.9 * r["bytes"] for r in rows if r["variant"] in proxies
               and r["scenario"] in ("throughput", "connections", "latency"))
    assert all(r["writes"] == 0 for r in rows if r["case"].startswith("no-op"))
    assert "x kernel" in result.stdout  # the table
    compared = subprocess.run([sys.executable, "-m", "bench", "--compare", str(out), str(out)],
                              capture_output=True, text=True)
    assert compared.returncode == 0 and "1.00" in compared.stdout
    assert left == []


def test_quick_upstreams_bench_runs_every_variant_and_cleans_up(lab, tmp_path):
    """bench/upstreams.py: through microsocks, tproxyd and redsocks each carry their runs (the
    harness checks their counters), the 100,000-CIDR relay too; a table comes out."""
    out = tmp_path / "upstreams.jsonl"
    result, left = run_own_lab([sys.executable, "-m", "bench.upstreams", "--quick", "--out",
                                str(out)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = "\n".join(ln for ln in result.stderr.splitlines() if " failed: " in ln)[-3000:]
    seen = {(r["figure"], r["variant"]) for r in rows}
    for figure in ("throughput", "rate", "latency"):
        assert {(figure, v) for v in ("kernel", "tproxyd", "redsocks")} <= seen, failed
    assert {("routes", "tproxyd-direct"), ("routes", "tproxyd-100k")} <= seen, failed
    assert all(r["carried_connections"] >= r["connections"] for r in rows if r["variant"] != "kernel")
    assert "tproxyd / redsocks" in result.stdout and "100k / none" in result.stdout
    assert left == []


def test_side_by_side_runs_two_labs_at_once_and_cleans_up(lab):
    """bench.percore, bench.accesslog / bench.sniffing --side-by-side and bench.profile
    --compare --side-by-side: two labs, both proxies running at the same time (each carried
    connections; the log logged every one of them; the named relay read every name), a ratio
    printed, nothing left."""
    python = sys.executable
    for cmd, printed in (
            (["bench.percore"], "tproxyd / haproxy conn/s median x"),
            (["bench.accesslog", "--side-by-side"], "side by side, 1 runs: conn/s to a file / off"),
            (["bench.sniffing", "--side-by-side", "--domains", "1000"],
             "side by side, 1 runs: 1000 names / none: conn/s median x"),
            (["bench.profile", "--compare", python, python, "--side-by-side", "--access-log"],
             "side by side, 1 runs: conn/s B/A median x")):
        result, left = run_own_lab([python, "-m", *cmd, "--repeat", "1", "--seconds", "1"],
                                   timeout=300)
        assert result.returncode == 0, (cmd, result.stderr[-3000:])
        assert printed in result.stdout, (cmd, result.stdout)
        assert left == [], cmd
