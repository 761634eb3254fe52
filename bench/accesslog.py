"""The access log's cost: new connections per second with [log] access off and to a file.

    python -m bench.accesslog [--seconds S] [--repeat N]   (root: runs in a lab)
    python -m bench.accesslog --formatter                  (no root: the formatter alone)

The connections scenario of `python -m bench` (loadgen rate, 64 at once, 100 bytes each way,
its threads; per core as there: the relay on CPU 0, the load generator and its server on CPU 1,
--no-pin to leave it to the scheduler), run for the two variants interleaved (off, file, off,
file, ...) so a noisy neighbour hits both alike; prints each variant's median and the file's
cost relative to off, in connections per second and in the relay's CPU time per connection
(steadier on a shared machine). The relay's counters prove it carried the traffic and the log's
line count that it logged every connection.

--formatter times one line with the format string the relay uses against json.dumps of a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit

from bench.__main__ import (
    ONE_CLIENT,
    Case,
    Tproxyd,
    install,
    loadgen,
    pin,
    rate_run,
    run_once,
)
from lab import Lab
from tproxyd.relay.accesslog import line


class Logged(Tproxyd):
    name = "tproxyd-log"

    def __init__(self, lab: Lab):
        super().__init__(lab)
        self.log = os.path.join(lab.tmp, "access.log")
        self.config = lab.write_config(lab.config(
            extra=f'{ONE_CLIENT}[log]\naccess = "{self.log}"\n', destinations='["198.18.2.0/24"]'),
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accesslog")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--formatter", action="store_true")
    p.add_argument("--no-pin", action="store_true", help="leave CPUs to the scheduler")
    args = p.parse_args(argv)
    if args.formatter:
        formatter()
        return 0
    install()
    pin(not args.no_pin)
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
            for v in variants:  # interleaved
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
    print(f"access log to a file costs {100 * (off - on) / off:.1f}% of connections per second")
    c_off, c_on = (statistics.median(cpu[k]) for k in ("tproxyd", "tproxyd-log"))
    print(f"relay CPU a connection: off {c_off:.1f} us, to a file {c_on:.1f} us "
          f"(+{100 * (c_on - c_off) / c_off:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
