"""`python -m bench`: tproxyd against the kernel's own forwarding, interleaved, in one lab.

Scenarios so far:
  throughput  iperf3, 1 and 4 TCP streams: kernel forwarding (the limit) and the tproxyd relay
  memory      relay RSS per idle connection, with thousands held open
  control     `tproxy apply` with 10, 1,000 and 100,000 destination CIDRs: converge, no-op
              (kernel writes must be 0) and a 1% change; time, kernel writes and peak RSS

Each case runs for each of its variants interleaved (A B A B ...) so a noisy neighbour hits
them alike; the table shows medians with min/max and the ratio to the kernel where it ran.
Each tproxyd run proves from the relay's counters that the relay carried the traffic, and
records the relay's CPU time.

    python -m bench [--quick] [--only SCENARIO] [--repeat N] [--out FILE]
    python -m bench --compare OLD.jsonl NEW.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lab import WAN, Lab, wait_for_port
from tproxyd.relay.loop import read_stats
from tproxyd.state.config import Marks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "tests", "kernel", "peers.py")
TPROXY = [sys.executable, "-m", "tproxyd.reconciler.cli"]
# `tproxy` in-process, reporting its own peak RSS (KiB) on stderr's last line
TPROXY_RSS = [sys.executable, "-c", "import resource, sys; from tproxyd.reconciler.cli import main; "
              "rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
              "sys.exit(rc)"]


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_times(pid))


# Per core (issue 16): the proxy under test on CPU 0, the load generator, the servers and
# iperf3 on CPU 1, so that a proxy's figure is what one core of it does. main() sets these
# (--no-pin leaves them empty); tproxyd-2w is not pinned (two workers want both cores).
PROXY_CPU, LOAD_CPU = "0", "1"
PROXY_PIN: tuple[str, ...] = ()
LOAD_PIN: tuple[str, ...] = ()


def pin(wanted: bool = True) -> bool:
    """Per core: the proxy on PROXY_CPU, the load on LOAD_CPU, for every Variant and loadgen()
    started after this (bench.accesslog and bench.sniffing call it too). False: not pinned."""
    global PROXY_PIN, LOAD_PIN
    if not wanted or (os.cpu_count() or 1) < 2:
        return False
    PROXY_PIN, LOAD_PIN = ("taskset", "-c", PROXY_CPU), ("taskset", "-c", LOAD_CPU)
    return True


def traced_child(pid: int) -> int:
    """The process under `strace` (pid: strace's): it is ended by its own PID, since a
    strace that is killed only detaches it."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    return int(children[0]) if children else pid


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Variant:
    name = "?"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.proc = None
        self.wrap: tuple[str, ...] = ()  # e.g. strace, set by run_once for a case that asks

    def up(self) -> None: ...

    def down(self) -> None: ...

    def pid(self) -> int:
        """The proxy's own process (`ip netns exec` and taskset exec it; strace does not)."""
        assert self.proc is not None
        return traced_child(self.proc.pid) if self.wrap else self.proc.pid

    def stop_proxy(self) -> None:
        if self.proc is None:
            return
        if self.wrap and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid(), signal.SIGTERM)
        self.lab.stop(self.proc, timeout=60)
        self.proc = None

    def relay_cpu(self) -> tuple[float, float]:
        """(user, system) seconds of the proxy so far."""
        return cpu_times(self.pid()) if self.proc else (0.0, 0.0)

    def relay_bytes(self) -> int:
        return 0


class Kernel(Variant):
    """Plain forwarding, nothing captured: the limit."""

    name = "kernel"


# the lab's servers' network (lab.WAN): what every bench's config captures
SERVERS = str(ipaddress.ip_network(f"{WAN.peer4}/24", strict=False))
DESTINATIONS = json.dumps([SERVERS])

# the load generator is one client address holding up to 10,000 connections
ONE_CLIENT = "[relay]\nmax_connections_per_client = 16384\n"


class Tproxyd(Variant):
    name = "tproxyd"
    python = sys.executable  # another checkout's venv python runs that checkout's relay and rules

    def __init__(self, lab: Lab):
        super().__init__(lab)
        self.config = lab.write_config(lab.config(extra=ONE_CLIENT, destinations=DESTINATIONS),
                                       "bench.toml")
        self.stats = f"{lab.tmp}/state/relay.sock"

    def up(self) -> None:
        self.lab.run(self.lab.gw, self.python, *TPROXY[1:], "apply", "-c", self.config)
        self.proc = self.lab.spawn(self.lab.gw, *PROXY_PIN, *self.wrap, self.python, "-m",
                                   "tproxyd.relay", "-c", self.config)
        wait_for_port(self.lab, self.lab.gw, 12345)

    def down(self) -> None:
        self.stop_proxy()
        self.lab.run(self.lab.gw, self.python, *TPROXY[1:], "down", "-c", self.config)

    def relay_bytes(self) -> int:
        s = read_stats(self.stats)
        return s["bytes_up"] + s["bytes_down"] + s["udp_bytes_up"] + s["udp_bytes_down"]


HAPROXY_CFG = """
global
    maxconn {maxconn}
    nbthread 1
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    {splice}
frontend captured
    bind 0.0.0.0:12345 transparent
    bind :::12345 v6only transparent
    default_backend original_destination
backend original_destination
    source 0.0.0.0 usesrc clientip
    server s 0.0.0.0
"""


# tproxyd's ruleset knows the relay's connections by a conntrack mark its output chain sets
# from the relay's socket mark (SO_MARK); HAProxy 2.6 cannot mark its server connections
# (set-bc-mark came in 2.8), so this table marks them in the same hook, at the same cost.
HAPROXY_NFT = f"""table inet bench_haproxy {{
    chain output {{
        type filter hook output priority mangle; policy accept;
        ip daddr {SERVERS} ct mark set ct mark | {Marks().relay:#x}
    }}
}}
"""


class Haproxy(Tproxyd):
    """HAProxy 2.6 from Debian in transparent mode, one thread, on the same nft rules."""

    def __init__(self, lab: Lab, splice: bool):
        super().__init__(lab)
        self.name = "haproxy" + ("-splice" if splice else "")
        self.stats = f"{lab.tmp}/{self.name}.sock"
        # maxconn under the open-file limit (20,000 here): splice costs a pipe per direction
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxconn = (limit - 200) // (6 if splice else 2) if limit != resource.RLIM_INFINITY else 10000
        self.cfg = lab.write_config(HAPROXY_CFG.format(
            maxconn=min(maxconn, 10000), stats=self.stats,
            splice="option splice-request\n    option splice-response" if splice else ""),
            f"{self.name}.cfg")

    def up(self) -> None:
        self.lab.run(self.lab.gw, *TPROXY, "apply", "-c", self.config)
        self.lab.run(self.lab.gw, "nft", "-f", "-", input=HAPROXY_NFT)
        self.proc = self.lab.spawn(self.lab.gw, *PROXY_PIN, *self.wrap, "haproxy", "-db", "-f",
                                   self.cfg)
        wait_for_port(self.lab, self.lab.gw, 12345)

    def down(self) -> None:
        super().down()
        self.lab.run(self.lab.gw, "nft", "delete", "table", "inet", "bench_haproxy")

    def relay_bytes(self) -> int:
        """Bytes in and out of the frontend, from HAProxy's own counters."""
        import socket as _socket

        with _socket.socket(_socket.AF_UNIX) as s:
            s.connect(self.stats)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "captured" and row.get("svname") == "FRONTEND":
                return int(row["bin"]) + int(row["bout"])
        return 0


class TproxydWorkers(Variant):
    """The daemon, as deployed, with relay.workers = N sharing the listeners."""

    def __init__(self, lab: Lab, workers: int):
        super().__init__(lab)
        self.name = f"tproxyd-{workers}w"
        os.makedirs(os.path.join(lab.tmp, self.name), exist_ok=True)
        self.config = lab.write_config(lab.config(
            extra=f"{ONE_CLIENT}workers = {workers}\n", destinations=DESTINATIONS,
            protocols='["tcp"]'), f"{self.name}/tproxy.toml")
        self.socket = f"{lab.tmp}/state/tproxyd.sock"

    def _workers(self) -> list[dict]:
        from tproxyd.reconciler.daemon import query

        return query(self.socket)["workers"]

    def up(self) -> None:
        self.proc = self.lab.spawn(self.lab.gw, sys.executable, "-m", "tproxyd.reconciler.daemon",
                                   "-c", self.config)
        deadline = time.monotonic() + 20
        # up when the daemon lists its workers and each worker has made its stats socket
        while not os.path.exists(self.socket) or not self._workers() \
                or not all(os.path.exists(w["stats"]) for w in self._workers()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{self.name} did not start: {self.lab.log_of(self.proc)}")
            time.sleep(0.05)
        wait_for_port(self.lab, self.lab.gw, 12345)

    def down(self) -> None:
        self.lab.stop(self.proc, timeout=60)
        self.proc = None

    def relay_cpu(self) -> tuple[float, float]:
        if not self.proc:
            return 0.0, 0.0
        times = [cpu_times(w["pid"]) for w in self._workers()]
        return sum(u for u, _ in times), sum(t for _, t in times)

    def relay_bytes(self) -> int:
        return sum(read_stats(w["stats"])["bytes_up"] + read_stats(w["stats"])["bytes_down"]
                   for w in self._workers())


class Cli(Variant):
    """No set-up: the scenario drives `tproxy` itself."""

    name = "tproxy-cli"


@dataclass
class Case:
    name: str
    run: Callable[[Variant], dict]  # returns a row with "value" (and anything else to keep)
    unit: str
    variants: tuple[str, ...] = ("kernel", "tproxyd")
    carried: bool = True  # the tproxyd row must show the relay carried "bytes"
    wrap: Callable[[Lab], tuple[str, ...]] | None = None  # the proxy runs under this command
    finish: Callable[[Variant, dict], None] | None = None  # after the proxy stopped


SCENARIOS: dict[str, Callable[[Lab, bool], list[Case]]] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def throughput(lab: Lab, quick: bool) -> list[Case]:
    seconds = 2 if quick else 10
    lab.spawn(lab.server, *LOAD_PIN, "iperf3", "-s", "-p", "5201")
    wait_for_port(lab, lab.server, 5201)

    def iperf(streams: int) -> dict:
        out = lab.run(lab.client, *LOAD_PIN, "iperf3", "-c", WAN.peer4, "-p", "5201", "-t", str(seconds),
                      "-P", str(streams), "-J", timeout=seconds + 30)
        end = json.loads(out.stdout)["end"]
        return {"value": end["sum_received"]["bits_per_second"] / 1e9,
                "bytes": end["sum_sent"]["bytes"],
                "client_cpu_pct": end["cpu_utilization_percent"]["host_total"]}

    return [Case(f"tcp {n} stream{'s' if n > 1 else ''}", lambda v, n=n: iperf(n), "Gbit/s",
                 ("kernel", "tproxyd", "tproxyd-2w", "haproxy", "haproxy-splice")) for n in (1, 4)]


# loadgen rate's epoll threads: one tops out near 16k connections/s here, the kernel's row limit
RATE_THREADS = 2


def loadgen(lab: Lab) -> str:
    """The C load generator, built for this run (epoll; `rate` with RATE_THREADS threads)."""
    import subprocess

    path = os.path.join(lab.tmp, "loadgen")
    if not os.path.exists(path):
        subprocess.run(["gcc", "-O2", "-pthread", "-o", path, os.path.join(ROOT, "bench", "loadgen.c")],
                       check=True)
        # Many short connections: TIME_WAIT ports may be reused, and the client's ports and the
        # relay's (spoofed from the client's address) never meet: a forwarded SYN that matches
        # one of the relay's TIME_WAIT sockets is dropped (early demux), which would stall the
        # kernel variant right after a proxied one.
        for ns, ports in ((lab.client, "1024 32767"), (lab.gw, "32768 65535")):
            lab.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            lab.sysctl(ns, "net.ipv4.ip_local_port_range", ports)
        lab.spawn(lab.server, *LOAD_PIN, path, "server", "7200")
        wait_for_port(lab, lab.server, 7200)
    return path


def rate_run(lab: Lab, gen: str, conc: int, seconds: int, size: int, *extra: str,
             slack: int = 60) -> dict:
    """One `loadgen rate` run from the client namespace, pinned as the bench is (pin()), with
    RATE_THREADS threads: its JSON row. extra: a request file instead of `size` bytes."""
    out = lab.run(lab.client, *LOAD_PIN, gen, "rate", WAN.peer4, "7200", str(conc), str(seconds),
                  str(size), str(RATE_THREADS), *extra, timeout=seconds + slack)
    return json.loads(out.stdout)


@scenario
def connections(lab: Lab, quick: bool) -> list[Case]:
    """New connections per second, each a 100-byte request and a 100-byte answer, 64 at once."""
    gen, seconds = loadgen(lab), 2 if quick else 10

    def rate(v: Variant) -> dict:
        row = rate_run(lab, gen, 64, seconds, 100)
        return {**row, "value": row["conn_per_s"], "bytes": row["done"] * 200, "ops": row["done"]}

    return [Case("rate, concurrency 64", rate, "conn/s",
                 ("kernel", "tproxyd", "tproxyd-2w", "haproxy", "haproxy-splice"))]


@scenario
def syscalls(lab: Lab, quick: bool) -> list[Case]:
    """Syscalls per connection of each proxy, counted by `strace -c -f` in a short rate run
    of its own (strace slows the proxy many times over: only the counts mean anything)."""
    gen, seconds = loadgen(lab), 2

    def wrap(lab: Lab) -> tuple[str, ...]:
        return ("strace", "-c", "-f", "-o", os.path.join(lab.tmp, "strace.txt"))

    def rate(v: Variant) -> dict:
        row = rate_run(lab, gen, 64, seconds, 100, slack=120)
        return {**row, "value": 0.0, "bytes": row["done"] * 200, "ops": row["done"]}

    def count(v: Variant, row: dict) -> None:
        by_name = strace_counts(os.path.join(lab.tmp, "strace.txt"))
        ops = max(row["done"], 1)
        row["value"] = round(sum(by_name.values()) / ops, 2)
        row["syscalls_per_conn"] = {k: round(n / ops, 2) for k, n in sorted(
            by_name.items(), key=lambda kv: -kv[1]) if n / ops >= 0.05}

    return [Case("syscalls per connection", rate, "calls/conn", ("tproxyd", "haproxy"),
                 wrap=wrap, finish=count)]


def strace_counts(path: str) -> dict[str, int]:
    """calls by syscall name from `strace -c` output."""
    import re

    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                out[m.group(2)] = int(m.group(1))
    return out


@scenario
def latency(lab: Lab, quick: bool) -> list[Case]:
    """Ping-pong of 64-byte messages on one connection: round-trip percentiles."""
    gen, count = loadgen(lab), 2000 if quick else 20000

    def pingpong(v: Variant, key: str) -> dict:
        out = lab.run(lab.client, *LOAD_PIN, gen, "pingpong", WAN.peer4, "7200", str(count), "64")
        row = json.loads(out.stdout)
        return {**row, "value": row[key], "bytes": count * 128}

    variants = ("kernel", "tproxyd", "haproxy", "haproxy-splice")
    return [Case("ping-pong 64 B, p50", lambda v: pingpong(v, "p50_us"), "us", variants),
            Case("ping-pong 64 B, p99", lambda v: pingpong(v, "p99_us"), "us", variants)]


@scenario
def udp(lab: Lab, quick: bool) -> list[Case]:
    """Datagrams echoed through the relay, 32 in flight: rate and round-trip percentiles."""
    gen, count = loadgen(lab), 2000 if quick else 50000
    lab.spawn(lab.server, *LOAD_PIN, gen, "udpserver", "7300")
    wait_for_port(lab, lab.server, 7300, "udp")

    def echo(v: Variant, size: int) -> dict:
        out = lab.run(lab.client, *LOAD_PIN, gen, "udp", WAN.peer4, "7300", str(count), str(size),
                      "32", timeout=120)
        row = json.loads(out.stdout)
        return {**row, "value": row["datagrams_per_s"], "bytes": row["received"] * size * 2,
                "ops": row["received"]}

    return [Case(f"echo {size} B, 32 in flight", lambda v, size=size: echo(v, size), "dgram/s")
            for size in (64, 1400)]


def hard_nofile() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


@scenario
def memory(lab: Lab, quick: bool) -> list[Case]:
    # 10,000 asked; the hard open-file limit of this machine's sessions is 20,000 and a proxy
    # holds two sockets per idle connection (tproxyd makes pipes only for a flow that moves
    # 64 KiB at once), so 9,000 is what both proxies can hold here.
    count = 500 if quick else min(10_000, (hard_nofile() - 2000) // 2)
    server = lab.spawn(lab.server, sys.executable, PEERS, "echo", "7005")
    wait_for_port(lab, lab.server, 7005)

    def idle(v: Variant) -> dict:
        # the server shares the same limit: let it close the last run's connections first
        deadline = time.monotonic() + 120
        while len(os.listdir(f"/proc/{server.pid}/fd")) > 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        base = rss_kib(v.proc.pid)
        holder = lab.spawn(lab.client, sys.executable, PEERS, "hold", WAN.peer4, "7005",
                           str(count), "600")
        deadline = time.monotonic() + 120
        while f"held {count}" not in lab.log_of(holder):
            if holder.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"could not hold {count} connections: {lab.log_of(holder)}")
            time.sleep(0.1)
        held = rss_kib(v.proc.pid)
        lab.stop(holder)
        return {"value": (held - base) / count, "rss_base_kib": base, "rss_held_kib": held}

    return [Case(f"{count} idle connections", idle, "KiB/conn", ("tproxyd", "haproxy"),
                 carried=False)]


def forget_rendered(lab: Lab) -> None:
    shutil.rmtree(lab.env["TPROXYD_CACHE_DIR"], ignore_errors=True)


@scenario
def control(lab: Lab, quick: bool) -> list[Case]:
    sizes = (10, 1000) if quick else (10, 1000, 100_000)
    rng = random.Random(7)
    cases = []

    def apply(path: str) -> dict:
        t = time.monotonic()
        out = lab.run(lab.gw, *TPROXY_RSS, "apply", "--json", "-c", path, timeout=900)
        took = time.monotonic() - t
        return {"value": took, "writes": json.loads(out.stdout)["writes"],
                "peak_rss_mib": int(out.stderr.strip().splitlines()[-1]) / 1024}

    for n in sizes:
        cidrs = sorted({f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
                        for _ in range(n)})
        changed = cidrs[len(cidrs) // 100:] + [f"198.19.{i % 256}.{i // 256 * 4}/30"
                                               for i in range(max(1, len(cidrs) // 100))]

        def write(items: list[str], tag: str, n=n) -> str:
            listed = ", ".join(f'"{c}"' for c in items)
            return lab.write_config(lab.config(destinations=f"[{listed}]"), f"control-{n}-{tag}.toml")

        full, change = write(cidrs, "full"), write(changed, "change")

        # A new or edited file is parsed and rendered (cold); the no-op is the same file again,
        # which `tproxy` remembers rendered (desired_cache).
        def converge(v: Variant, full=full) -> dict:
            lab.run(lab.gw, *TPROXY, "down", "-c", full)
            forget_rendered(lab)
            return apply(full)

        def noop(v: Variant, full=full) -> dict:
            apply(full)
            return apply(full)

        def one_percent(v: Variant, full=full, change=change) -> dict:
            apply(full)
            forget_rendered(lab)
            return apply(change)

        cases += [Case(f"apply {n} CIDRs", converge, "s", ("tproxy-cli",), carried=False),
                  Case(f"no-op apply {n}", noop, "s", ("tproxy-cli",), carried=False),
                  Case(f"1% change at {n}", one_percent, "s", ("tproxy-cli",), carried=False)]
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="short runs, 2 repeats: a smoke check")
    p.add_argument("--only", choices=sorted(SCENARIOS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=f"bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    p.add_argument("--no-pin", action="store_true",
                   help="leave the proxy and the load generator to the scheduler")
    args = p.parse_args(argv)
    install()
    pinned = pin(not args.no_pin)
    if args.compare:
        compare(*args.compare)
        return 0
    repeat = 2 if args.quick else args.repeat
    rows: list[dict] = []
    with Lab(forwarding=True) as lab, open(args.out, "w") as out:
        variants = {"kernel": Kernel(lab), "tproxyd": Tproxyd(lab), "tproxy-cli": Cli(lab),
                    "tproxyd-2w": TproxydWorkers(lab, 2),
                    "haproxy": Haproxy(lab, splice=False), "haproxy-splice": Haproxy(lab, splice=True)}
        for name in [args.only] if args.only else SCENARIOS:
            for case in SCENARIOS[name](lab, args.quick):
                for i in range(repeat):
                    for vname in case.variants:  # interleaved: A B A B ...
                        v = variants[vname]
                        try:
                            row = run_once(v, case)
                        except (SystemExit, Exception) as exc:  # one failed run is noted
                            print(f"bench: {name} / {case.name} / {vname} run {i} failed: {exc}",
                                  file=sys.stderr)
                            continue
                        row.update(scenario=name, case=case.name, unit=case.unit, variant=vname,
                                   run=i, load=round(os.getloadavg()[0], 2))
                        rows.append(row)
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(json.dumps(row), file=sys.stderr, flush=True)
    table(rows, pinned)
    print(f"raw results: {args.out}")
    return 0


def install() -> None:
    """The load generators and peers the bench needs, from Debian, when missing."""
    import shutil
    import subprocess

    missing = [pkg for cmd, pkg in (("iperf3", "iperf3"), ("haproxy", "haproxy"),
                                    ("strace", "strace"), ("taskset", "util-linux"))
               if not shutil.which(cmd)]
    if missing:
        print(f"bench: apt-get install {' '.join(missing)}", file=sys.stderr)
        subprocess.run(["sh", os.path.join(ROOT, ".ci", "setup")], check=True)


def run_once(v: Variant, case: Case) -> dict:
    v.wrap = case.wrap(v.lab) if case.wrap else ()
    v.up()
    try:
        (user0, sys0), bytes0 = v.relay_cpu(), v.relay_bytes()
        row = case.run(v)
        user1, sys1 = v.relay_cpu()
        row.update(relay_cpu_s=round(user1 - user0 + sys1 - sys0, 3),
                   relay_user_s=round(user1 - user0, 3), relay_sys_s=round(sys1 - sys0, 3),
                   relay_bytes=v.relay_bytes() - bytes0)
        # a proxy may count a connection's bytes only once it has closed it (HAProxy does)
        deadline = time.monotonic() + 3
        while case.carried and v.name != "kernel" and time.monotonic() < deadline \
                and row["relay_bytes"] < row.get("bytes", 1) * 0.9:
            time.sleep(0.1)
            row["relay_bytes"] = v.relay_bytes() - bytes0
    finally:
        v.down()
        v.wrap = ()
    if case.finish:
        case.finish(v, row)
    if case.carried and v.name != "kernel" and row["relay_bytes"] < row.get("bytes", 1) * 0.9:
        raise SystemExit(f"{v.name} did not carry the traffic: {row}")
    return row


def side_by_side(run: Callable[[Variant], dict], a: Variant, b: Variant) -> tuple[dict, dict]:
    """Run a and b at the same time, each in its own lab: their proxies share PROXY_CPU, their
    load generators LOAD_CPU. Two saturated proxies on one core get equal CPU time from the
    scheduler, so the ratio of their rates is the ratio of their costs per operation, measured
    over the same seconds: a machine whose speed drifts (a shared VM, +-15% over minutes) moves
    both alike. run(v) is a Case's run (rate_case()); each row gets the proxy's CPU, as
    run_once's. The labs: two_labs(), swapped each repeat so a difference between them cancels."""
    variants = (a, b)
    rows: list[dict] = [{}, {}]
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            rows[i] = run(variants[i])
        except BaseException as exc:  # raised again in the caller's thread
            errors.append(exc)

    started: list[Variant] = []
    try:
        for v in variants:
            v.up()
            started.append(v)
        cpu0 = [v.relay_cpu() for v in variants]
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for row, v, (user0, sys0) in zip(rows, variants, cpu0):
            user1, sys1 = v.relay_cpu()
            row.update(relay_cpu_s=round(user1 - user0 + sys1 - sys0, 3),
                       relay_user_s=round(user1 - user0, 3), relay_sys_s=round(sys1 - sys0, 3))
    finally:
        for v in started:
            v.down()
    return rows[0], rows[1]


@contextlib.contextmanager
def two_labs() -> Iterator[tuple[Lab, Lab]]:
    """Two labs for side_by_side(), each with its load generator's server up. Pinning is the
    method: unpinned, the scheduler would not split one core between the proxies."""
    if not PROXY_PIN:
        raise SystemExit("side by side needs the proxies pinned (two CPUs, no --no-pin)")
    with Lab(forwarding=True) as a, Lab(forwarding=True) as b:
        loadgen(a)
        loadgen(b)
        yield a, b


def rate_case(conc: int, seconds: int, size: int, *extra: str) -> Callable[[Variant], dict]:
    """side_by_side()'s run: one rate_run() in the variant's own lab; value: conn/s."""
    def run(v: Variant) -> dict:
        row = rate_run(v.lab, loadgen(v.lab), conc, seconds, size, *extra)
        return {**row, "value": row["conn_per_s"]}
    return run


def ratios(b: dict, a: dict) -> tuple[float, float]:
    """b against a, two side_by_side() rows: the rates' ratio and CPU per connection's."""
    return (b["value"] / a["value"],
            (b["relay_cpu_s"] / b["done"]) / (a["relay_cpu_s"] / a["done"]))


def summary(rows: list[dict]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["scenario"], r["case"], r["variant"])
        d = out.setdefault(key, {"values": [], "cpu": [], "user_op": [], "sys_op": [],
                                 "unit": r["unit"]})
        d["values"].append(r["value"])
        d["cpu"].append(r.get("relay_cpu_s", 0))
        if r.get("ops") and "relay_user_s" in r and r["variant"] != "kernel":
            d["user_op"].append(r["relay_user_s"] / r["ops"] * 1e6)
            d["sys_op"].append(r["relay_sys_s"] / r["ops"] * 1e6)
    return out


RATES = ("Gbit/s", "conn/s", "dgram/s")  # more is better: compared with the kernel's row
GENERATOR_LIMIT = 0.8  # a proxy row at 80% of the kernel's or more: the generator may limit it


def table(rows: list[dict], pinned: bool = False) -> None:
    s = summary(rows)
    print(f"{'scenario':11} {'case':24} {'variant':14} {'median':>10} {'min':>9} {'max':>9} "
          f"{'unit':10} {'x kernel':>8} {'relay cpu s':>11} {'user us/op':>10} {'sys us/op':>9}")
    flagged = False
    for (sc, case, variant), d in s.items():
        med = statistics.median(d["values"])
        base = s.get((sc, case, "kernel"))
        ratio, mark = f"{'':8}", ""
        if base:
            r = med / statistics.median(base["values"])
            ratio = f"{r:8.2f}"
            if variant != "kernel" and d["unit"] in RATES and r >= GENERATOR_LIMIT:
                mark, flagged = " *", True
        per_op = (f"{statistics.median(d['user_op']):10.1f} {statistics.median(d['sys_op']):9.1f}"
                  if d["user_op"] else f"{'':10} {'':9}")
        print(f"{sc:11} {case:24} {variant:14} {med:10.3f} {min(d['values']):9.3f} "
              f"{max(d['values']):9.3f} {d['unit']:10} {ratio} {statistics.median(d['cpu']):11.2f} "
              f"{per_op}{mark}")
    if flagged:
        print(f"* at {GENERATOR_LIMIT:.0%} of the kernel's row or more: the load generator may be "
              "the limit of that figure, not the proxy")
    print("pinned: the proxy on CPU 0; load generator, servers and iperf3 on CPU 1 (tproxyd-2w "
          "not pinned)" if pinned else "not pinned")
    loads = [r["load"] for r in rows if "load" in r]
    if loads:  # how busy the machine was: the benchmark itself accounts for about 1-2 of it
        print(f"machine: {os.cpu_count()} CPUs; 1-minute load average over the runs: median "
              f"{statistics.median(loads):.2f}, max {max(loads):.2f}")


def compare(old_path: str, new_path: str) -> None:
    def load(path: str) -> dict:
        with open(path) as f:
            return summary([json.loads(line) for line in f if line.strip()])

    old, new = load(old_path), load(new_path)
    print(f"{'scenario':11} {'case':24} {'variant':14} {'old':>10} {'new':>10} {'new/old':>8}")
    for key in new:
        if key in old:
            a, b = statistics.median(old[key]["values"]), statistics.median(new[key]["values"])
            print(f"{key[0]:11} {key[1]:24} {key[2]:14} {a:10.3f} {b:10.3f} "
                  f"{(b / a if a else float('nan')):8.2f}")


if __name__ == "__main__":
    sys.exit(main())
