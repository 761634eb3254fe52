"""The access log's cost: new connections per second with [log] access off and to a file.

    python -m bench.accesslog [--seconds S] [--repeat N]   (root: runs in a lab)
    python -m bench.accesslog --side-by-side [--seconds S] [--repeat N]   (root: two labs)
    python -m bench.accesslog --formatter                  (no root: the log's own path)

The connections scenario of `python -m bench` (loadgen rate, 64 at once, 100 bytes each way,
its threads; per core as there: the relay on CPU 0, the load generator and its server on CPU 1,
--no-pin to leave it to the scheduler), run for the two variants interleaved in ABBA order (off,
file, file, off, ...) so a noisy neighbour and any order effect hit both alike; prints each
variant's median and the file's cost relative to off, in connections per second and in the
relay's CPU time per connection, and the median of the repeats' paired ratios (the two runs of
a repeat are next to each other: the machine's drift over minutes, +-15% on a shared VM, falls
out). The relay's counters prove it carried the traffic and the log's line count that it
logged every connection.

--side-by-side runs off and to a file at the same time, each in its own lab, the two relays on
CPU 0 and the two generators on CPU 1 (bench.__main__.side_by_side): the scheduler gives two
saturated relays equal CPU time, so the ratio of their rates is the log's cost, measured over
the same seconds. Each repeat puts the log in the other lab. The figure is the median ratio;
an A/A run (the same relay twice) gives x1.000 with runs within +-0.6%.

--formatter times one line with the format string the relay uses against json.dumps of a dict,
then the whole path of an ended connection (its line made, kept and written to a file with the
loop turn's other lines, 1 or 31 of them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from types import SimpleNamespace

from bench.__main__ import (
    DESTINATIONS,
    ONE_CLIENT,
    Case,
    Tproxyd,
    install,
    loadgen,
    pin,
    rate_case,
    rate_run,
    ratios,
    run_once,
    side_by_side,
    two_labs,
)
from lab import Lab
from tproxyd.relay.accesslog import AccessLog, line, tcp_line


class Logged(Tproxyd):
    name = "tproxyd-log"

    def __init__(self, lab: Lab):
        super().__init__(lab)
        self.log = os.path.join(lab.tmp, "access.log")
        self.config = lab.write_config(lab.config(
            extra=f'{ONE_CLIENT}[log]\naccess = "{self.log}"\n', destinations=DESTINATIONS),
            "bench-log.toml")

    def lines(self) -> int:
        with open(self.log, "rb") as f:
            return sum(1 for _ in f)


def formatter() -> None:
    args = (1764683754.123, "tcp", ("10.0.0.1", 40000), ("198.18.2.1", 443), "direct", "direct",
            1234, 567890, 1.234, 0.003, "client_fin")

    def as_dict() -> bytes:
        return (json.dumps({"ts": "2025-12-02T13:55:54.123Z", "proto": "tcp",
                            "client": "10.0.0.1:40000", "dst": "198.18.2.1:443",
                            "route": "direct", "via": "direct", "bytes_up": 1234,
                            "bytes_down": 567890, "duration_ms": 1234, "connect_ms": 3,
                            "end": "client_fin"}, separators=(",", ":")) + "\n").encode()

    for name, fn in (("format string (relay)", lambda: line(*args)), ("json.dumps(dict)", as_dict)):
        best = min(timeit.repeat(fn, number=100_000, repeat=7)) / 100_000
        print(f"{name:22} {best * 1e6:.2f} us a line")
    # the whole path of an ended connection: its line made, kept and written, with the loop
    # turn's other lines (1: an idle relay; 31: bench.accesslog's 64 connections at once)
    conn = SimpleNamespace(connected_at=10.0001, started=10.0, client_addr=("198.18.1.2", 40000),
                           dst=("198.18.2.1", 7200), route_name="direct", via="direct",
                           up=SimpleNamespace(bytes=100), down=SimpleNamespace(bytes=100))
    with tempfile.TemporaryDirectory() as tmp:
        log = AccessLog(os.path.join(tmp, "access.log"), lambda: None)
        for per_turn in (1, 31):
            def turn(per_turn: int = per_turn) -> None:
                for _ in range(per_turn):
                    log.write(tcp_line(conn, "client_fin", 10.002, time.time()))
                log.flush()
            n = 100_000 // per_turn
            best = min(timeit.repeat(turn, number=n, repeat=7)) / (n * per_turn)
            print(f"a connection, {per_turn:2} a turn {best * 1e6:.2f} us a line")
        log.close()


def side_by_side_runs(args: argparse.Namespace) -> int:
    """Off and to a file at the same time (bench.__main__.side_by_side), each repeat with the
    log in the other lab: the ratio of their rates is the log's cost."""
    rates, cpu = [], []
    rate = rate_case(64, args.seconds, 100)
    with two_labs() as (a, b):
        for i in range(args.repeat):
            off, on = (Tproxyd(a), Logged(b)) if i % 2 == 0 else (Tproxyd(b), Logged(a))
            before = on.lines() if os.path.exists(on.log) else 0
            r_off, r_on = side_by_side(rate, off, on)
            assert on.lines() - before >= r_on["done"], (on.lines() - before, r_on)
            r, c = ratios(r_on, r_off)
            rates.append(r)
            cpu.append(c)
            print(f"run {i} off {r_off['value']:6.0f} conn/s, to a file {r_on['value']:6.0f} "
                  f"conn/s: x{r:.3f}; relay CPU a connection x{c:.3f}", file=sys.stderr, flush=True)
    rates.sort()
    print(f"side by side, {len(rates)} runs: conn/s to a file / off median "
          f"{statistics.median(rates):.3f} (cost {100 * (1 - statistics.median(rates)):.1f}%; "
          f"runs {[round(r, 3) for r in rates]}); relay CPU a connection "
          f"x{statistics.median(cpu):.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accesslog")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--formatter", action="store_true")
    p.add_argument("--no-pin", action="store_true", help="leave CPUs to the scheduler")
    p.add_argument("--side-by-side", action="store_true",
                   help="off and to a file at the same time, in two labs, sharing the cores")
    args = p.parse_args(argv)
    if args.formatter:
        formatter()
        return 0
    install()
    pin(not args.no_pin)
    if args.side_by_side:
        return side_by_side_runs(args)
    values: dict[str, list[float]] = {"tproxyd": [], "tproxyd-log": []}
    cpu: dict[str, list[float]] = {"tproxyd": [], "tproxyd-log": []}  # relay CPU us/connection
    with Lab(forwarding=True) as lab:
        gen = loadgen(lab)

        def rate(v) -> dict:
            row = rate_run(lab, gen, 64, args.seconds, 100)
            return {**row, "value": row["conn_per_s"], "bytes": row["done"] * 200}

        case = Case("rate, concurrency 64", rate, "conn/s")
        variants = [Tproxyd(lab), Logged(lab)]
        for i in range(args.repeat):
            for v in variants if i % 2 == 0 else variants[::-1]:  # interleaved, ABBA
                before = v.lines() if isinstance(v, Logged) and os.path.exists(v.log) else 0
                row = run_once(v, case)
                if isinstance(v, Logged):  # every connection logged, none dropped
                    assert v.lines() - before >= row["done"], (v.lines() - before, row)
                values[v.name].append(row["value"])
                cpu[v.name].append(row["relay_cpu_s"] / row["done"] * 1e6)
                print(f"run {i} {v.name:12} {row['value']:10.0f} conn/s "
                      f"{cpu[v.name][-1]:6.1f} us relay CPU a connection", file=sys.stderr,
                      flush=True)
    off, on = (statistics.median(values[k]) for k in ("tproxyd", "tproxyd-log"))
    for k, vs in values.items():
        print(f"{k:12} median {statistics.median(vs):9.0f} conn/s  (min {min(vs):.0f}, "
              f"max {max(vs):.0f}, {len(vs)} runs)")
    print(f"access log to a file costs {100 * (off - on) / off:.1f}% of connections per second "
          "(medians)")
    c_off, c_on = (statistics.median(cpu[k]) for k in ("tproxyd", "tproxyd-log"))
    print(f"relay CPU a connection: off {c_off:.1f} us, to a file {c_on:.1f} us "
          f"(+{100 * (c_on - c_off) / c_off:.1f}%)")
    # each repeat's two runs are next to each other: their ratio leaves out the machine's drift
    pairs = sorted(on / off for on, off in zip(values["tproxyd-log"], values["tproxyd"]))
    cpu_pairs = sorted(on / off for on, off in zip(cpu["tproxyd-log"], cpu["tproxyd"]))
    print(f"paired: conn/s to a file / off median {statistics.median(pairs):.3f} (cost "
          f"{100 * (1 - statistics.median(pairs)):.1f}%; pairs {[round(r, 3) for r in pairs]}); "
          f"relay CPU a connection x{statistics.median(cpu_pairs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
