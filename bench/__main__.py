"""`python -m bench`: tproxyd against the kernel's own forwarding, interleaved, in one lab.

So far: throughput (iperf3, 1 and 4 streams) for the variants "kernel" (plain forwarding: the
limit) and "tproxyd" (the relay, default settings, spoof_source on). Each proxied run proves the
relay carried the bytes (its counters) and records the relay's CPU time. Runs are interleaved
(A B A B ...) so that a noisy neighbour hits every variant alike; medians with min/max.

    python -m bench [--quick] [--only SCENARIO] [--repeat N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

from tproxyd.reconciler.lab import WAN, Lab, wait_for_port
from tproxyd.relay.loop import read_stats

TPROXY = [sys.executable, "-m", "tproxyd.reconciler.cli"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Variant:
    def __init__(self, name: str, lab: Lab):
        self.name, self.lab = name, lab
        self.proc = None

    def up(self) -> None: ...

    def down(self) -> None: ...

    def relay_cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def relay_bytes(self) -> int:
        return 0


class Kernel(Variant):
    """Plain forwarding, nothing captured: the limit."""


class Tproxyd(Variant):
    def __init__(self, name: str, lab: Lab, config: str):
        super().__init__(name, lab)
        self.config = config
        self.stats = f"{lab.tmp}/state/relay.sock"

    def up(self) -> None:
        self.lab.run(self.lab.gw, *TPROXY, "apply", "-c", self.config)
        self.proc = self.lab.spawn(self.lab.gw, sys.executable, "-m", "tproxyd.relay",
                                   "-c", self.config)
        wait_for_port(self.lab, self.lab.gw, 12345)

    def down(self) -> None:
        self.lab.stop(self.proc)
        self.proc = None
        self.lab.run(self.lab.gw, *TPROXY, "down", "-c", self.config)

    def relay_bytes(self) -> int:
        s = read_stats(self.stats)
        return s["bytes_up"] + s["bytes_down"]


def iperf(lab: Lab, streams: int, seconds: float) -> dict:
    out = lab.run(lab.client, "iperf3", "-c", WAN.peer4, "-p", "5201", "-t", str(seconds),
                  "-P", str(streams), "-J", timeout=seconds + 30)
    report = json.loads(out.stdout)
    end = report["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "bytes": end["sum_sent"]["bytes"],
            "client_cpu_pct": end["cpu_utilization_percent"]["host_total"]}


SCENARIOS: dict[str, Callable[[Lab, bool], list[tuple[str, Callable[[], dict]]]]] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def throughput(lab: Lab, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    seconds = 2 if quick else 10
    lab.spawn(lab.server, "iperf3", "-s", "-p", "5201")
    wait_for_port(lab, lab.server, 5201)
    return [(f"tcp {n} stream{'s' if n > 1 else ''}", lambda n=n: iperf(lab, n, seconds))
            for n in (1, 4)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="short runs, 2 repeats: a smoke check")
    p.add_argument("--only", choices=sorted(SCENARIOS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=f"bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    args = p.parse_args(argv)
    repeat = 2 if args.quick else args.repeat
    rows = []
    with Lab(forwarding=True) as lab, open(args.out, "w") as out:
        config = lab.write_config(lab.config(destinations='["198.18.2.0/24"]', protocols='["tcp"]'))
        variants = [Kernel("kernel", lab), Tproxyd("tproxyd", lab, config)]
        for name in [args.only] if args.only else SCENARIOS:
            for case, run in SCENARIOS[name](lab, args.quick):
                for i in range(repeat):
                    for v in variants:  # interleaved: A B A B ...
                        v.up()
                        try:
                            cpu0, bytes0 = v.relay_cpu(), v.relay_bytes()
                            row = run()
                            row.update(relay_cpu_s=round(v.relay_cpu() - cpu0, 3),
                                       relay_bytes=v.relay_bytes() - bytes0)
                        finally:
                            v.down()
                        if v.name != "kernel" and row["relay_bytes"] < row.get("bytes", 1) * 0.9:
                            raise SystemExit(f"{v.name} did not carry the traffic: {row}")
                        row.update(scenario=name, case=case, variant=v.name, run=i,
                                   load=os.getloadavg()[0])
                        rows.append(row)
                        out.write(json.dumps(row) + "\n")
                        print(json.dumps(row), file=sys.stderr, flush=True)
    table(rows)
    print(f"raw results: {args.out}")
    return 0


def table(rows: list[dict]) -> None:
    cases = sorted({(r["scenario"], r["case"]) for r in rows})
    print(f"{'scenario':12} {'case':16} {'variant':10} {'median Gbit/s':>14} {'min':>7} {'max':>7} "
          f"{'x kernel':>9} {'relay cpu s':>12}")
    for sc, case in cases:
        subset = [r for r in rows if (r["scenario"], r["case"]) == (sc, case)]
        base = statistics.median(r["gbit_s"] for r in subset if r["variant"] == "kernel")
        for variant in dict.fromkeys(r["variant"] for r in subset):
            vals = [r["gbit_s"] for r in subset if r["variant"] == variant]
            cpu = statistics.median(r["relay_cpu_s"] for r in subset if r["variant"] == variant)
            med = statistics.median(vals)
            print(f"{sc:12} {case:16} {variant:10} {med:14.2f} {min(vals):7.2f} {max(vals):7.2f} "
                  f"{med / base:9.2f} {cpu:12.2f}")


if __name__ == "__main__":
    sys.exit(main())
