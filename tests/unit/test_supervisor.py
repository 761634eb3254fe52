"""The supervisor's bookkeeping without root: workers are stand-in processes (`sleep`), which
SIGUSR2 (drain) ends as it ends a real worker that has no connections left."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tproxyd.reconciler.supervisor import Slot, Supervisor, Worker
from tproxyd.state.config import Config, Daemon, RelayConfig


def supervisor(tmp_path: Path) -> Supervisor:
    sup = Supervisor(str(tmp_path / "tproxy.toml"))
    sup.config = Config(relay=RelayConfig(drain_timeout=5.0), daemon=Daemon(state_dir=str(tmp_path)))
    sup.slots = [Slot()]
    return sup


def stand_in(sup: Supervisor, tmp_path: Path, slot: int = 0) -> Worker:
    """A worker whose stats socket file exists, as a killed worker's would."""
    stats = tmp_path / f"relay-{slot}-{len(sup.workers)}.sock"
    stats.touch()
    proc = subprocess.Popen(["sleep", "60"])
    w = Worker(slot, proc, str(stats), time.monotonic())
    sup.workers.append(w)
    return w


def test_stop_removes_every_workers_stats_socket(tmp_path: Path):
    sup = supervisor(tmp_path)
    workers = [stand_in(sup, tmp_path, slot) for slot in range(3)]
    sup.stop(timeout=5)
    assert not sup.workers
    assert all(w.proc.poll() is not None for w in workers)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".sock"] == []


def test_counters_keep_what_ended_workers_counted(tmp_path: Path):
    """Totals never go down: a worker that drained, died or was replaced leaves its counts
    behind, summed generically (any integer a worker reports), gauges aside."""
    sup = supervisor(tmp_path)
    first = stand_in(sup, tmp_path)
    first.last = {"pid": 11, "started": 1.5, "accepted": 5, "active": 2, "bytes_up": 100,
                  "end_client_reset": 1, "pipe_memory": 65536, "udp_held": 2}
    assert sup.counters() == {"accepted": 5, "active": 2, "bytes_up": 100, "end_client_reset": 1,
                              "pipe_memory": 65536, "udp_held": 2}
    first.proc.kill()
    first.proc.wait()
    sup.tick(time.monotonic())  # reaped: its counts are retired, its open connections are gone
    assert first not in sup.workers
    second = stand_in(sup, tmp_path)  # its replacement counts from zero
    second.last = {"pid": 12, "accepted": 1, "active": 1, "udp_sessions": 3, "new_counter": 7}
    totals = sup.counters()
    assert totals == {"accepted": 6, "active": 1, "bytes_up": 100, "end_client_reset": 1,
                      "udp_sessions": 3, "new_counter": 7, "pipe_memory": 0, "udp_held": 0}
    sup.stop(timeout=5)
    after = sup.counters()
    assert after["accepted"] == 6 and after["new_counter"] == 7 and after["active"] == 0


def test_upstream_gauges_are_not_kept_after_a_worker_ends(tmp_path: Path):
    """upstream_<name>_up and _active say "now"; its connections and failures are totals."""
    sup = supervisor(tmp_path)
    w = stand_in(sup, tmp_path)
    w.last = {"upstream_corp_up": 1, "upstream_corp_active": 3, "upstream_corp_failures": 2,
              "upstream_corp_connections": 9, "route_r_connections": 9,
              # labelled totals, even through an upstream whose name ends like a gauge
              "connections|tcp|r|x_up|client_fin": 4, "bytes|down|x_active": 50}
    w.proc.kill()
    w.proc.wait()
    sup.tick(time.monotonic())
    assert sup.counters() == {"upstream_corp_up": 0, "upstream_corp_active": 0,
                              "upstream_corp_failures": 2, "upstream_corp_connections": 9,
                              "route_r_connections": 9, "connections|tcp|r|x_up|client_fin": 4,
                              "bytes|down|x_active": 50}
    sup.stop(timeout=5)


def test_a_change_of_upstreams_or_routes_replaces_the_workers():
    from tproxyd.reconciler.daemon import relay_view
    from tproxyd.state.loader import from_bytes

    base = (b'[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\ndestinations = ["0.0.0.0/0"]\n'
            b'[[upstream]]\nname = "a"\ntype = "socks5"\naddress = "198.18.3.2:1080"\n')
    route = b'[[route]]\nports = [443]\nvia = ["a"]\n'
    one = from_bytes(base + route, "t.toml")
    assert relay_view(one) == relay_view(from_bytes(base + route, "t.toml"))
    assert relay_view(one) != relay_view(from_bytes(base, "t.toml"))
    moved = base.replace(b"1080", b"1081") + route
    assert relay_view(one) != relay_view(from_bytes(moved, "t.toml"))
