"""`python -m bench.upstreams`: through a SOCKS5 upstream, tproxyd against redsocks (issue 12).

One lab: client -> gateway -> server, and microsocks (Debian) in a namespace of its own, p,
hung off the gateway: the upstream of both proxies. Variants, interleaved (A B C A B C ...):

    kernel           the gateway forwards; nothing captured, no upstream: the baseline
    tproxyd          the relay captures every connection (tproxy) and routes it via microsocks
    redsocks         redsocks 0.5 from Debian (splice on) behind an nft REDIRECT, same upstream
    tproxyd-direct   the relay, no routes: straight to the server      } the cost of matching
    tproxyd-100k     the relay, 100,000 destination CIDRs in 10 routes } 100,000 CIDRs
                     (via direct; the lab's server is in the last one)  } at accept

Figures: one TCP stream (iperf3, Gbit/s), new connections a second (bench/loadgen.c rate, 100
bytes each way, several epoll threads) and round trips (loadgen pingpong, 64 bytes: p50, p99
and what each adds to the kernel's). Each row proves the proxy carried the traffic (the relay's
counters: connections through the upstream or the big route; redsocks: the REDIRECT rule's
counter, one packet a connection) and records the proxy's CPU time.

Pinning (default; --no-pin to leave it to the scheduler): the proxy under test on CPU 0; the
load generator, the servers and microsocks on CPU 1.

    python -m bench.upstreams [--quick] [--repeat N] [--only rate,routes,...] [--out FILE]
    python -m bench.upstreams --routes-side-by-side [--repeat N]

--routes-side-by-side weighs the routes figure alone the way bench.percore weighs HAProxy: the
relay with no routes and the relay with 100,000 CIDRs at the same time, in two labs, both on
CPU 0 (the generators on CPU 1): the ratio of their rates, free of the machine's drift (which
moves interleaved runs by more than the 5% the goal allows).

Prints a Markdown table (medians of N with min and max; ratios and added latencies are medians
of per-round pairs: each round's proxy run against the same round's baseline run) and writes
every run as a JSON line to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from lab import WAN, Lab, wait_for_port
from tproxyd.relay.loop import read_stats

from .__main__ import (
    DESTINATIONS,
    ONE_CLIENT,
    RATE_THREADS,
    SERVERS,
    TPROXY,
    Tproxyd,
    cpu_seconds,
    install,
    loadgen,
    pin,
    rate_case,
    ratios,
    side_by_side,
    two_labs,
)
from .routes import random_cidrs

P4, GW_P4 = "198.18.3.2", "198.18.3.1"  # microsocks' namespace and the gateway's side of it
SOCKS_PORT, REDSOCKS_PORT = 1080, 12346
PROXY_CPU, LOAD_CPU = "0", "1"
THREADS = RATE_THREADS  # loadgen rate's epoll threads
CONC = 64
GENERATOR_LIMIT = 0.8  # a proxy row at this share of the kernel row: the generator may be the limit


class Variant:
    name = "?"
    proxy = True

    def __init__(self, bench: Bench):
        self.bench, self.lab = bench, bench.lab
        self.proc: subprocess.Popen | None = None

    def up(self) -> None: ...

    def down(self) -> None: ...

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def carried(self) -> dict:
        """Counters whose growth proves this variant carried a run's connections."""
        return {}


class Kernel(Variant):
    name, proxy = "kernel", False


class Relay(Variant):
    """The relay alone (python -m tproxyd.relay), as the other benchmarks run it."""

    def __init__(self, bench: Bench, name: str, tail: str, proof: str):
        super().__init__(bench)
        self.name, self.proof = name, proof
        self.config = self.lab.write_config(self.lab.config(
            extra=ONE_CLIENT, destinations=DESTINATIONS, protocols='["tcp"]') + tail,
            f"{name}.toml")
        self.stats = f"{self.lab.tmp}/state/relay.sock"

    def up(self) -> None:
        self.lab.run(self.lab.gw, *TPROXY, "apply", "-c", self.config, timeout=300)
        self.proc = self.lab.spawn(self.lab.gw, *self.bench.pin(PROXY_CPU), sys.executable,
                                   "-m", "tproxyd.relay", "-c", self.config)
        wait_for_port(self.lab, self.lab.gw, 12345, timeout=60)

    def down(self) -> None:
        self.lab.stop(self.proc)
        self.proc = None
        self.lab.run(self.lab.gw, *TPROXY, "down", "-c", self.config, timeout=300)

    def carried(self) -> dict:
        s = read_stats(self.stats)
        return {"connections": s[self.proof], "bytes": s["bytes_up"] + s["bytes_down"]}


REDSOCKS_CONF = """base {{ log_debug = off; log_info = off; log = stderr; daemon = off;
        redirector = iptables; }}
redsocks {{ local_ip = 0.0.0.0; local_port = {port}; ip = {ip}; port = {upstream_port};
        type = socks5; splice = on; listenq = 4096; }}
"""
# REDIRECT is NAT: only a connection's first packet passes the chain, so the counter's packets
# are the connections redirected.
REDSOCKS_NFT = """table ip bench_redsocks {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "lan0" ip daddr {SERVERS} meta l4proto tcp counter redirect to :{port}
    }}
}}
"""


def redsocks_binary() -> str:
    """.ci/setup puts Debian's /usr/sbin/redsocks in the venv (the package would add a user
    and start a service on the host); an installed one does too."""
    local = os.path.join(os.path.dirname(sys.executable), "redsocks")
    found = local if os.access(local, os.X_OK) else shutil.which("redsocks")
    if not found:
        raise SystemExit("redsocks is missing: run sh .ci/setup")
    return found


class Redsocks(Variant):
    name = "redsocks"

    def __init__(self, bench: Bench):
        super().__init__(bench)
        self.conf = self.lab.write_config(REDSOCKS_CONF.format(
            port=REDSOCKS_PORT, ip=P4, upstream_port=SOCKS_PORT), "redsocks.conf")
        self.nft = self.lab.write_config(REDSOCKS_NFT.format(port=REDSOCKS_PORT, SERVERS=SERVERS),
                                         "redsocks.nft")
        self.binary = redsocks_binary()

    def up(self) -> None:
        self.lab.run(self.lab.gw, "nft", "-f", self.nft)
        self.proc = self.lab.spawn(self.lab.gw, *self.bench.pin(PROXY_CPU), self.binary,
                                   "-c", self.conf)
        wait_for_port(self.lab, self.lab.gw, REDSOCKS_PORT)

    def down(self) -> None:
        self.lab.stop(self.proc)
        self.proc = None
        self.lab.run(self.lab.gw, "nft", "delete", "table", "ip", "bench_redsocks")

    def carried(self) -> dict:
        out = self.lab.run(self.lab.gw, "nft", "-j", "list", "table", "ip", "bench_redsocks").stdout
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return {"connections": expr["counter"]["packets"]}
        raise SystemExit("redsocks: no counter in its nft table")


def routes_100k(count: int = 100_000, routes: int = 10) -> str:
    """[[route]] tables holding `count` random destination CIDRs (IPv4 and IPv6, as
    bench/routes.py makes them), via direct; the lab's server network is in the last route,
    `big`, so every benchmark connection is matched against them all and counted there."""
    nets = [str(c) for c in random_cidrs(random.Random(12), count)]
    out = []
    for i in range(routes):
        mine = nets[i::routes] + ([SERVERS] if i == routes - 1 else [])
        name = "big" if i == routes - 1 else f"route{i}"
        listed = ", ".join(f'"{n}"' for n in mine)
        out.append(f'[[route]]\nname = "{name}"\nvia = "direct"\ndestinations = [{listed}]\n')
    return "\n".join(out)


@dataclass
class Case:
    name: str
    figure: str  # throughput, rate, latency, routes
    unit: str
    variants: tuple[str, ...]
    run: Callable[[], dict]  # a row with "value", "connections" (made by the run), "bytes"
    higher_is_better: bool = True


class Bench:
    def __init__(self, lab: Lab, quick: bool, pin: bool):
        self.lab, self.quick, self.pinning = lab, quick, pin
        self.proxy_ns = lab.gw[: -len("-gw")] + "-p"

    def pin(self, cpu: str) -> tuple[str, ...]:
        return ("taskset", "-c", cpu) if self.pinning else ()

    def setup(self) -> None:
        """Namespace p with microsocks, routed through the gateway (not captured: only lan0 is),
        and the servers."""
        lab, ns = self.lab, self.proxy_ns
        subprocess.run(["ip", "netns", "add", ns], check=True)
        lab.created.append(ns)  # removed with the lab
        lab.ip(ns, "link", "set", "lo", "up")
        subprocess.run(["ip", "-n", lab.gw, "link", "add", "px0", "type", "veth", "peer", "name",
                        "eth0", "netns", ns], check=True)
        lab.ip(lab.gw, "addr", "add", f"{GW_P4}/24", "dev", "px0")
        lab.ip(ns, "addr", "add", f"{P4}/24", "dev", "eth0")
        lab.ip(lab.gw, "link", "set", "px0", "up")
        lab.ip(ns, "link", "set", "eth0", "up")
        lab.ip(ns, "route", "add", "default", "via", GW_P4)
        # microsocks closes first towards the server: TIME_WAIT there, many connections a second
        lab.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
        lab.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")
        if not shutil.which("microsocks"):
            raise SystemExit("microsocks is missing: run sh .ci/setup")
        self.socks = lab.spawn(ns, *self.pin(LOAD_CPU), "microsocks", "-i", "0.0.0.0", "-p",
                               str(SOCKS_PORT))
        wait_for_port(lab, ns, SOCKS_PORT)
        self.gen = loadgen(lab)  # builds it, starts its server (unpinned: re-pinned below)
        lab.spawn(lab.server, *self.pin(LOAD_CPU), "iperf3", "-s", "-p", "5201")
        wait_for_port(lab, lab.server, 5201)
        if self.pinning:  # loadgen's server, started by bench.__main__.loadgen()
            for proc in lab.procs:
                if list(proc.args[-2:]) == ["server", "7200"]:
                    subprocess.run(["taskset", "-a", "-p", "-c", LOAD_CPU, str(proc.pid)],
                                   check=True, capture_output=True)

    def variants(self) -> dict[str, Variant]:
        via = (f'[[upstream]]\nname = "ms"\ntype = "socks5"\naddress = "{P4}:{SOCKS_PORT}"\n'
               f'check_interval = 0\n[[route]]\nname = "all"\nvia = ["ms"]\n')
        return {"kernel": Kernel(self),
                "tproxyd": Relay(self, "tproxyd", via, "upstream_ms_connections"),
                "redsocks": Redsocks(self),
                "tproxyd-direct": Relay(self, "tproxyd-direct", "", "accepted"),
                "tproxyd-100k": Relay(self, "tproxyd-100k", routes_100k(),
                                      "route_big_connections")}

    # --- the figures ---------------------------------------------------------------------------

    def cases(self) -> list[Case]:
        lab, gen, quick = self.lab, self.gen, self.quick
        seconds = 2 if quick else 10
        count = 2000 if quick else 20000
        upstream3 = ("kernel", "tproxyd", "redsocks")

        def iperf() -> dict:
            out = lab.run(lab.client, *self.pin(LOAD_CPU), "iperf3", "-c", WAN.peer4, "-p",
                          "5201", "-t", str(seconds), "-J", timeout=seconds + 30)
            end = json.loads(out.stdout)["end"]
            return {"value": end["sum_received"]["bits_per_second"] / 1e9,
                    "bytes": end["sum_received"]["bytes"], "connections": 2}  # control + data

        def rate() -> dict:
            out = lab.run(lab.client, *self.pin(LOAD_CPU), gen, "rate", WAN.peer4, "7200",
                          str(CONC), str(seconds), "100", str(THREADS), timeout=seconds + 60)
            row = json.loads(out.stdout)
            return {**row, "value": row["conn_per_s"], "bytes": row["done"] * 200,
                    "connections": row["done"]}

        def pingpong() -> dict:
            out = lab.run(lab.client, *self.pin(LOAD_CPU), gen, "pingpong", WAN.peer4, "7200",
                          str(count), "64", timeout=120)
            row = json.loads(out.stdout)
            return {**row, "value": row["p99_us"], "bytes": count * 128, "connections": 1}

        return [
            Case("one TCP stream (iperf3)", "throughput", "Gbit/s", upstream3, iperf),
            Case(f"new connections, 100 B each way, {CONC} at once", "rate", "conn/s",
                 upstream3, rate),
            Case("64 B ping-pong, one connection: p99", "latency", "us", upstream3, pingpong,
                 higher_is_better=False),
            Case("new connections: no routes vs 100,000 CIDRs", "routes", "conn/s",
                 ("tproxyd-direct", "tproxyd-100k"), rate),
        ]


def run_once(v: Variant, case: Case) -> dict:
    v.up()
    try:
        socks = v.bench.socks.pid
        before, cpu0, socks0 = v.carried(), v.cpu(), cpu_seconds(socks)
        row = case.run()
        row["proxy_cpu_s"] = round(v.cpu() - cpu0, 3)
        row["upstream_cpu_s"] = round(cpu_seconds(socks) - socks0, 3)  # microsocks
        after = v.carried()
    finally:
        v.down()
    if v.proxy:
        moved = after["connections"] - before["connections"]
        row["carried_connections"] = moved
        if moved < row["connections"]:
            raise SystemExit(f"{v.name} did not carry the traffic: {moved} connections counted, "
                             f"{row['connections']} made: {row}")
        if "bytes" in after and after["bytes"] - before["bytes"] < 0.9 * row["bytes"]:
            raise SystemExit(f"{v.name} did not carry the bytes: {row}")
        if row.get("done"):
            row["proxy_cpu_us_per_conn"] = round(row["proxy_cpu_s"] / row["done"] * 1e6, 1)
    return row


# --- the table -----------------------------------------------------------------------------------

def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-" \
           f"{fmt.format(max(values))})"


def paired(rows: list[dict], case: str, a: str, b: str, op: Callable[[float, float], float]):
    """op(a's value, b's value) per round where both ran: the same round's pair."""
    by = {(r["variant"], r["run"]): r["value"] for r in rows if r["case"] == case}
    return [op(by[(a, i)], by[(b, i)]) for (v, i) in by if v == a and (b, i) in by]


def table(rows: list[dict], cases: list[Case], pinned: bool) -> str:
    fmt = {"Gbit/s": "{:.2f}", "conn/s": "{:,.0f}", "us": "{:.0f}"}
    out = ["| figure | kernel (direct) | tproxyd via microsocks | redsocks via microsocks "
           "| tproxyd / kernel | redsocks / kernel | tproxyd / redsocks |",
           "|---|---|---|---|---|---|---|"]
    notes = []
    for case in cases:
        values = {v: [r["value"] for r in rows if r["case"] == case.name and r["variant"] == v]
                  for v in case.variants}
        if case.figure == "routes":
            continue
        cells = [spread(values[v], fmt[case.unit]) + f" {case.unit}" if values[v] else "-"
                 for v in ("kernel", "tproxyd", "redsocks")]
        ratio = (lambda a, b: a - b) if case.figure == "latency" else (lambda a, b: a / b)
        how = "{:+.0f} us" if case.figure == "latency" else "{:.2f}"
        pairs = [paired(rows, case.name, a, b, ratio) for a, b in
                 (("tproxyd", "kernel"), ("redsocks", "kernel"), ("tproxyd", "redsocks"))]
        cells += [how.format(statistics.median(p)) if p else "-" for p in pairs]
        out.append(f"| {case.name} | " + " | ".join(cells) + " |")
        if case.figure == "latency":
            p50 = {v: [r["p50_us"] for r in rows if r["case"] == case.name and r["variant"] == v]
                   for v in case.variants}
            out.append("| same, p50 | " + " | ".join(
                spread(p50[v], "{:.0f}") + " us" if p50[v] else "-"
                for v in ("kernel", "tproxyd", "redsocks")) + " | | | |")
        if case.figure == "rate":
            cpu = {v: [r["proxy_cpu_us_per_conn"] for r in rows if r["case"] == case.name
                       and r["variant"] == v and "proxy_cpu_us_per_conn" in r]
                   for v in ("tproxyd", "redsocks")}
            out.append("| proxy CPU per connection | | " + " | ".join(
                spread(cpu[v], "{:.0f}") + " us" if cpu[v] else "-"
                for v in ("tproxyd", "redsocks")) + " | | | |")
            base = values["kernel"]
            for v in ("tproxyd", "redsocks"):
                if base and values[v] and statistics.median(values[v]) >= \
                        GENERATOR_LIMIT * statistics.median(base):
                    notes.append(f"{v}: {case.name}: at {GENERATOR_LIMIT:.0%} of the kernel row "
                                 f"or more: generator may be the limit")
    for case in cases:
        if case.figure != "routes":
            continue
        direct = [r["value"] for r in rows if r["case"] == case.name
                  and r["variant"] == "tproxyd-direct"]
        big = [r["value"] for r in rows if r["case"] == case.name and r["variant"] == "tproxyd-100k"]
        pairs = paired(rows, case.name, "tproxyd-100k", "tproxyd-direct", lambda a, b: a / b)
        cpu = {v: [r["proxy_cpu_us_per_conn"] for r in rows if r["case"] == case.name
                   and r["variant"] == v and "proxy_cpu_us_per_conn" in r]
               for v in ("tproxyd-direct", "tproxyd-100k")}
        if direct and big:
            cpu_ratio = (statistics.median(cpu["tproxyd-100k"])
                         / statistics.median(cpu["tproxyd-direct"]))
            out.append(f"| relay, direct: no routes / 100,000 CIDRs in 10 routes | | "
                       f"{spread(direct, '{:,.0f}')} / {spread(big, '{:,.0f}')} conn/s | | | | "
                       f"100k / none: {statistics.median(pairs):.3f} |")
            out.append(f"| same, relay CPU per connection | | "
                       f"{spread(cpu['tproxyd-direct'], '{:.0f}')} / "
                       f"{spread(cpu['tproxyd-100k'], '{:.0f}')} us | | | | "
                       f"100k / none: {cpu_ratio:.3f} |")
    n = max((r["run"] for r in rows), default=-1) + 1
    loads = [r["load"] for r in rows]
    out.append("")
    out.append(f"Medians of {n} interleaved rounds (min-max); ratios and added latencies are "
               f"medians of each round's pair. "
               + ("Pinned: the proxy under test on CPU 0; load generator (loadgen rate with "
                  f"{THREADS} threads, {CONC} connections at once), servers and microsocks on "
                  "CPU 1." if pinned else "Not pinned."))
    if loads:
        out.append(f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), kernel {platform.release()}, "
                   f"shared with other work: 1-minute load average over the runs median "
                   f"{statistics.median(loads):.2f}, max {max(loads):.2f}.")
    out += notes
    return "\n".join(out)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


class Cidrs(Tproxyd):
    """bench.__main__'s relay with routes_100k(): every connection matched against them all."""

    name = "tproxyd-100k"

    def __init__(self, lab: Lab):
        super().__init__(lab)
        self.config = lab.write_config(lab.config(extra=ONE_CLIENT, destinations=DESTINATIONS)
                                       + routes_100k(), "bench-100k.toml")

    def up(self) -> None:
        super().up()
        self.before = read_stats(self.stats).get("route_big_connections", 0)

    def matched(self) -> int:
        return read_stats(self.stats)["route_big_connections"] - self.before


def routes_side_by_side(repeat: int, seconds: int = 10) -> int:
    """No routes and 100,000 CIDRs at the same time (bench.__main__.side_by_side), each repeat
    with the big routes in the other lab."""
    pin(True)
    rate = rate_case(CONC, seconds, 100)

    def run(v: Tproxyd) -> dict:
        row = rate(v)
        if isinstance(v, Cidrs):  # proof: every connection was matched to the last route
            assert v.matched() >= row["done"], (v.matched(), row)
        return row

    rates, cpu = [], []
    with two_labs() as (a, b):
        for i in range(repeat):
            x, y = (a, b) if i % 2 == 0 else (b, a)
            r_none, r_big = side_by_side(run, Tproxyd(x), Cidrs(y))
            r, c = ratios(r_big, r_none)
            rates.append(r)
            cpu.append(c)
            print(f"run {i}: no routes {r_none['value']:6.0f} conn/s, 100,000 CIDRs "
                  f"{r_big['value']:6.0f}: x{r:.3f}", file=sys.stderr, flush=True)
    print(f"side by side, {len(rates)} runs: 100,000 CIDRs / no routes: conn/s median "
          f"x{statistics.median(rates):.3f} (runs {sorted(round(r, 3) for r in rates)}); relay "
          f"CPU a connection x{statistics.median(cpu):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstreams")
    p.add_argument("--quick", action="store_true", help="short runs, 2 rounds: a smoke check")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", help="comma-separated figures: throughput,rate,latency,routes")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--out", default=f"bench-upstreams-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    p.add_argument("--routes-side-by-side", action="store_true",
                   help="the routes figure only: no routes and 100,000 CIDRs at the same time")
    args = p.parse_args(argv)
    if args.routes_side_by_side:
        if args.quick or args.only or not args.pin:
            p.error("--routes-side-by-side takes --repeat only: pinned, 10 s runs, routes alone")
        install()
        return routes_side_by_side(args.repeat)
    repeat = 2 if args.quick else args.repeat
    only = set(args.only.split(",")) if args.only else None
    rows: list[dict] = []
    with Lab(forwarding=True) as lab, open(args.out, "w") as out:
        bench = Bench(lab, args.quick, args.pin)
        bench.setup()
        variants = bench.variants()
        cases = [c for c in bench.cases() if only is None or c.figure in only]
        for case in cases:
            for i in range(repeat):
                for name in case.variants:  # interleaved: A B C A B C ...
                    try:
                        row = run_once(variants[name], case)
                    except (SystemExit, Exception) as exc:  # one failed run is noted
                        print(f"bench: {case.name} / {name} run {i} failed: {exc}", file=sys.stderr)
                        continue
                    row.update(case=case.name, figure=case.figure, unit=case.unit, variant=name,
                               run=i, load=round(os.getloadavg()[0], 2))
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows, cases, args.pin))
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
