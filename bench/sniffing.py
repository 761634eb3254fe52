"""Routes by name through the relay: new TLS-looking connections per second with 1,000 and
100,000 `domains` names against none, and the latency a sniff adds to a connection.

    python -m bench.sniffing [--seconds S] [--repeat N] [--domains 1000,100000]   (root: a lab)
    python -m bench.sniffing --side-by-side [...]    (rates: none and named at the same time)
    python -m bench.sniffing --gap [--repeat N]      (where an idle relay's added latency goes)

The connections scenario of `python -m bench` (per core, as there: the relay on CPU 0, the
load generator and its server on CPU 1; --no-pin to leave it to the scheduler), with curl's
recorded ClientHello (517 bytes, SNI www.example.com, tests/data/tls/curl-tls13.bin) as each
connection's request, echoed back by the server. Variants, run interleaved (none, 1k, 100k;
1k, 100k, none; ...) so a noisy neighbour hits them alike; each ratio to none is given as the
ratio of medians and as the median of the repeats' paired ratios (runs of one repeat are next
to each other, so the machine's drift over minutes falls out):
  tproxyd        no routes: routed at accept, as without `domains`
  tproxyd-Nk     N random names in 10 `domains` routes via direct, "example.com" among the
                 first route's: every connection waits for its first bytes, reads the name,
                 matches the first route and goes direct
--side-by-side runs the rate case only, no routes and each named variant at the same time in
two labs sharing the cores (bench.__main__.side_by_side; see bench.accesslog): the median
ratio of their rates, free of the machine's drift.
--gap runs the one-at-a-time case, none, 1,000 CIDRs and 1,000 names, with the gateway's
packets timestamped by the kernel (bench/wire.py): per connection, the client's handshake ACK
to its first bytes (the client's own time, which a relay routing by name must wait for), and
the relay's SYN to the server after each. Medians. The CIDRs variant (tproxyd-1k-cidrs: the
same 10 routes via direct, by `destinations`, the bench's servers in the first) is the baseline
"no domain routes" proper: it pays the route lookup at accept as the named one does, so the
named one's difference to it is the sniff alone (read, parse, the name's lookup).
The relay's counters prove a named variant sniffed every connection (route_named0_connections
equals the connections done). Rates: 64 connections at once; latency: one at a time (connect,
ClientHello, echo, close: p50 and p99), where a sniff's wait would show.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from bench import __main__ as bench_main  # LOAD_PIN, as pin() sets it
from bench import wire
from bench.__main__ import (
    DESTINATIONS,
    ONE_CLIENT,
    ROOT,
    SERVERS,
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
from bench.domains import random_names
from bench.routes import random_cidrs
from lab import Lab
from tproxyd.relay.loop import read_stats

HELLO = os.path.join(ROOT, "tests", "data", "tls", "curl-tls13.bin")
ROUTES = 10


def named_routes(count: int) -> str:
    """ROUTES `domains` routes via direct holding `count` names, "example.com" (the recorded
    ClientHello's name) in the first, "named0"."""
    names = random_names(random.Random(count), count - 1)
    return "".join(
        f'[[route]]\nname = "named{i}"\nvia = "direct"\ndomains = '
        f'{json.dumps(([] if i else ["example.com"]) + names[i::ROUTES])}\n'
        for i in range(ROUTES))


def cidr_routes(count: int) -> str:
    """named_routes() by `destinations` instead of `domains`: `count` random CIDRs in ROUTES
    routes via direct, the bench's servers in the first, "named0"."""
    nets = [str(c) for c in random_cidrs(random.Random(count), count - 1)]
    return "".join(
        f'[[route]]\nname = "named{i}"\nvia = "direct"\ndestinations = '
        f'{json.dumps(([] if i else [SERVERS]) + nets[i::ROUTES])}\n'
        for i in range(ROUTES))


class Named(Tproxyd):
    """tproxyd with `domains` routes of `count` random names; the bench's name is in the first."""

    def __init__(self, lab: Lab, count: int, by_address: bool = False):
        super().__init__(lab)
        self.name = f"tproxyd-{count // 1000}k" + ("-cidrs" if by_address else "")
        routes = cidr_routes(count) if by_address else named_routes(count)
        self.config = lab.write_config(lab.config(extra=ONE_CLIENT,
                                                  destinations=DESTINATIONS)
                                       + routes, f"bench-{self.name}.toml")

    def up(self) -> None:
        super().up()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.stats):  # opened just after the listeners
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: no stats socket at {self.stats}")
            time.sleep(0.05)
        self.before = read_stats(self.stats)["route_named0_connections"]

    def sniffed(self) -> int:
        return read_stats(self.stats)["route_named0_connections"] - self.before


def side_by_side_runs(args: argparse.Namespace) -> int:
    """The rate case with no routes and with each --domains count at the same time, in two
    labs sharing the cores (bench.__main__.side_by_side), each repeat with the named relay in
    the other lab: the ratio of their rates is the sniff's cost, free of the machine's drift."""
    counts = [int(n) for n in args.domains.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    hello = rate_case(64, args.seconds, 0, HELLO)

    def rate(v: Tproxyd) -> dict:
        row = hello(v)
        if isinstance(v, Named):  # proof, while it runs: each connection was read for its name
            assert v.sniffed() >= row["done"], (v.sniffed(), row)
        return row

    with two_labs() as (a, b):
        for i in range(args.repeat):
            x, y = (a, b) if i % 2 == 0 else (b, a)
            for n in counts:
                named = Named(y, n)
                r_base, r_named = side_by_side(rate, Tproxyd(x), named)
                r, c = ratios(r_named, r_base)
                rates[n].append(r)
                cpu[n].append(c)
                print(f"run {i} none {r_base['value']:6.0f} conn/s, {named.name} "
                      f"{r_named['value']:6.0f} conn/s: x{r:.3f}", file=sys.stderr, flush=True)
    for n in counts:
        rs = sorted(rates[n])
        print(f"side by side, {len(rs)} runs: {n} names / none: conn/s median "
              f"x{statistics.median(rs):.3f} (runs {[round(r, 3) for r in rs]}); relay CPU a "
              f"connection x{statistics.median(cpu[n]):.3f}")
    return 0


def gap_runs(args: argparse.Namespace) -> int:
    """--gap: what a sniff adds to one connection on an idle relay, taken apart on the wire."""
    seconds = 3

    def latency(v: Tproxyd) -> dict:
        out = f"{v.lab.tmp}/wire.json"
        capture = v.lab.spawn(v.lab.gw, *bench_main.LOAD_PIN, sys.executable, "-m", "bench.wire",
                              str(seconds + 3), "7200", out)
        time.sleep(1.5)  # the capture's socket is open well before this
        row = rate_run(v.lab, loadgen(v.lab), 1, seconds, 0, HELLO)  # one thread: conc 1
        capture.wait(timeout=30)
        with open(out) as f:
            seen = json.load(f)
        row["gaps"], row["dropped"] = wire.gaps(seen["packets"], 7200), seen["dropped"]
        if isinstance(v, Named):
            assert v.sniffed() >= row["done"], (v.sniffed(), row)
        return {**row, "value": row["conn_per_s"]}

    rows: dict[str, list[dict]] = {}
    with Lab(forwarding=True) as lab:
        loadgen(lab)
        case = Case("latency, one at a time, on the wire", latency, "conn/s")
        for i in range(args.repeat):
            variants = [Tproxyd(lab), Named(lab, 1000, by_address=True), Named(lab, 1000)]
            for v in variants[i % 3:] + variants[:i % 3]:  # each first in turn
                row = run_once(v, case)
                rows.setdefault(v.name, []).append(row)
                print(f"run {i} {v.name:16} p50 {row['p50_us']:6.1f} us, {len(row['gaps'])} "
                      f"of {row['done']} connections seen whole, {row['dropped']} packets "
                      f"dropped by the capture", file=sys.stderr, flush=True)
    print("medians over every connection seen (us): client ACK -> its first bytes; the relay's "
          "SYN to the server after the ACK, and after the first bytes; p50 of the connection, "
          "median of the runs'; relay CPU a connection")
    for name, runs in rows.items():
        every = [g for r in runs for g in r["gaps"]]
        if not every:
            raise SystemExit(f"{name}: the capture saw no connection whole")
        ack_data, ack_syn, data_syn = (statistics.median(c) * 1e6 for c in zip(*every))
        print(f"{name:16} ACK->bytes {ack_data:5.1f}  ACK->SYN {ack_syn:5.1f}  bytes->SYN "
              f"{data_syn:5.1f}  p50 {statistics.median(r['p50_us'] for r in runs):6.1f}  CPU "
              f"{statistics.median(r['relay_cpu_s'] / r['done'] * 1e6 for r in runs):6.1f} "
              f"({len(every)} connections)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sniffing")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--domains", default="1000,100000")
    p.add_argument("--no-pin", action="store_true", help="leave CPUs to the scheduler")
    p.add_argument("--side-by-side", action="store_true",
                   help="rates only: no routes and named at the same time, sharing the cores")
    p.add_argument("--gap", action="store_true",
                   help="one at a time, none and 1,000 names, timed on the wire (bench/wire.py)")
    args = p.parse_args(argv)
    install()
    pin(not args.no_pin)
    if args.side_by_side:
        return side_by_side_runs(args)
    if args.gap:
        return gap_runs(args)
    with Lab(forwarding=True) as lab:
        gen = loadgen(lab)
        variants = [Tproxyd(lab), *(Named(lab, int(n)) for n in args.domains.split(","))]

        def run(conc: int, seconds: int):
            def rate(v) -> dict:
                row = rate_run(lab, gen, conc, seconds, 0, HELLO)
                if isinstance(v, Named):  # proof: each connection was read for its name
                    assert v.sniffed() >= row["done"], (v.sniffed(), row)
                return {**row, "value": row["conn_per_s"], "bytes": row["done"] * 2 * 517}
            return rate

        cases = [Case("rate, concurrency 64", run(64, args.seconds), "conn/s"),
                 Case("latency, one at a time", run(1, max(2, args.seconds // 2)), "conn/s")]
        rows: dict[tuple[str, str], list[dict]] = {}
        for i in range(args.repeat):
            for case in cases:
                # interleaved, each repeat in another order (none, 1k, 100k; 1k, 100k, none; ...)
                # so that no variant always runs first or last
                for v in variants[i % len(variants):] + variants[:i % len(variants)]:
                    row = run_once(v, case)
                    rows.setdefault((case.name, v.name), []).append(row)
                    print(f"run {i} {case.name:24} {v.name:13} {row['value']:8.0f} conn/s "
                          f"p50 {row['p50_us']:7.1f} us p99 {row['p99_us']:8.1f} us "
                          f"relay CPU {row['relay_cpu_s'] / row['done'] * 1e6:6.1f} us/conn",
                          file=sys.stderr, flush=True)
    for case in cases:
        base = None
        for v in variants:
            rs = rows[(case.name, v.name)]
            rate = statistics.median(r["value"] for r in rs)
            p50 = statistics.median(r["p50_us"] for r in rs)
            p99 = statistics.median(r["p99_us"] for r in rs)
            cpu = statistics.median(r["relay_cpu_s"] / r["done"] * 1e6 for r in rs)
            base = base or (rate, p50, cpu, rs)
            # each repeat's runs are next to each other: their ratio leaves out the drift
            pairs = [r["value"] / b["value"] for r, b in zip(rs, base[3])]
            print(f"{case.name:24} {v.name:13} {rate:8.0f} conn/s ({rate / base[0]:.2f}x; "
                  f"paired {statistics.median(pairs):.3f}x) "
                  f"p50 {p50:7.1f} us ({p50 - base[1]:+.1f}) p99 {p99:8.1f} us "
                  f"relay CPU {cpu:6.1f} us/conn ({100 * (cpu - base[2]) / base[2]:+.1f}%) "
                  f"[{len(rs)} runs: {min(r['value'] for r in rs):.0f}-"
                  f"{max(r['value'] for r in rs):.0f} conn/s; pairs "
                  f"{min(pairs):.2f}-{max(pairs):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
