"""Where the relay's time goes per connection: CPU (user and system apart), syscalls, and Python
functions, during a connection-rate run (100 bytes each way, the server answers and closes;
--hello: curl's 517-byte ClientHello, echoed; --domains N: routed by name, as bench.sniffing's).

    python -m bench.profile [--seconds S] [--concurrency C] [--top N] [--no-strace] [--access-log]
                            [--hello] [--domains N]
    python -m bench.profile --compare A/.venv/bin/python B/.venv/bin/python [--repeat K]
                            [--side-by-side]

--compare weighs a change to the relay or the ruleset: two checkouts (each venv applies its own
tree's ruleset and runs its own tree's relay), run interleaved (A B A B ...) K times; medians
of conn/s and of user and system CPU per connection.
CPU per connection moves less with a noisy neighbour than conn/s does. With --side-by-side
the two relays run at the same time in two labs, pinned to one core (the generators to the
other), and the figure is the median ratio of their rates: on this shared VM, whose speed
drifts +-15% over minutes, a 1% change shows (interleaved runs resolve about 5%).

Three runs in one lab (client -> gateway -> server), each with a fresh relay:
  plain    the relay as it runs: connections, utime and stime per connection (/proc)
  cprofile the relay under cProfile: Python calls per connection and the functions with the most
           own time, per connection. cProfile's overhead inflates the figures (compare `plain`);
           read it for shares and call counts, not absolutes. On veth a socket.send() also runs
           the receiver's TCP processing (softirq in the sender's syscall), so `send` and `close`
           carry kernel time that is not the relay's own work.
  strace   the relay under `strace -c -f`: syscalls per connection by name (strace slows it a lot;
           only the counts matter)
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import statistics
import sys
from collections.abc import Callable

from bench.__main__ import (
    DESTINATIONS,
    ONE_CLIENT,
    TPROXY,
    Tproxyd,
    cpu_times,
    install,
    loadgen,
    pin,
    rate_case,
    ratios,
    side_by_side,
    strace_counts,
    traced_child,
    two_labs,
)
from bench.sniffing import HELLO, named_routes
from lab import WAN, Lab, wait_for_port
from tproxyd.relay.loop import read_stats


def one_run(lab: Lab, config: str, gen: str, seconds: int, conc: int,
            wrap: tuple[str, ...] = (), profile: bool = False, python: str = sys.executable,
            request: tuple[str, ...] = ()) -> dict:
    """request: (path,) sends that file as each connection's request (echoed back), instead of
    100 bytes each way."""
    cmd = [python, *(["-m", "cProfile", "-o", f"{lab.tmp}/prof"] if profile else [])]
    proc = lab.spawn(lab.gw, *wrap, *cmd, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345, timeout=30)
    pid = traced_child(proc.pid) if wrap else proc.pid  # netns exec execs; strace does not
    try:
        u0, s0 = cpu_times(pid)
        out = lab.run(lab.client, gen, "rate", WAN.peer4, "7200", str(conc), str(seconds),
                      "0" if request else "100", "1", *request,
                      timeout=seconds + 120)
        u1, s1 = cpu_times(pid)
        stats = read_stats(f"{lab.tmp}/state/relay.sock", timeout=30)
    finally:  # the relay itself: a killed strace would only detach it, and it would live on
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=120)
    row = json.loads(out.stdout)
    return {"generator": row, "connections": stats["accepted"], "user": u1 - u0,
            "system": s1 - s0, "log": lab.log_of(proc)}


def per_conn(seconds: float, n: int) -> str:
    return f"{seconds / max(n, 1) * 1e6:.1f} us"


def compare(lab: Lab, config: str, gen: str, args: argparse.Namespace) -> None:
    rows: dict[str, list[tuple[float, float, float]]] = {p: [] for p in args.compare}
    for _ in range(args.repeat):
        for python in args.compare:
            # each checkout's own ruleset too, so a change to the rules is weighed as well
            lab.run(lab.gw, python, *TPROXY[1:], "apply", "-c", config)
            r = one_run(lab, config, gen, args.seconds, args.concurrency, python=python,
                        request=args.request)
            n = max(r["connections"], 1)
            rows[python].append((r["generator"]["conn_per_s"], r["user"] / n * 1e6,
                                 r["system"] / n * 1e6))
    base = None
    print(f"{'conn/s':>8} {'user us':>8} {'sys us':>8}  (medians of {args.repeat}) relay")
    for python, runs in rows.items():
        med = [statistics.median(col) for col in zip(*runs)]
        base = base or med
        print(f"{med[0]:8.0f} {med[1]:8.1f} {med[2]:8.1f}  {python}  conn/s x{med[0] / base[0]:.3f}, "
              f"user x{med[1] / base[1]:.3f}; user runs {sorted(round(u, 1) for _, u, _ in runs)}")


class Checkout(Tproxyd):
    """The relay and ruleset of the checkout whose venv python this is, on bench.profile's
    config."""

    def __init__(self, lab: Lab, python: str, config: str):
        super().__init__(lab)
        self.python = self.name = python
        self.config = config


def logged(lab: Lab) -> int:
    """Lines in the lab's access log (--access-log) so far."""
    path = f"{lab.tmp}/access.log"
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def compare_side_by_side(args: argparse.Namespace, config_text: Callable[[Lab], str]) -> None:
    """--compare --side-by-side: the two checkouts' relays at the same time, pinned to one core
    (bench.__main__.side_by_side), each repeat with A and B in the other lab; the ratio of
    their rates is the ratio of their costs, free of the machine's drift."""
    pin(True)
    first, second = args.compare
    rates, cpu = [], []
    rate = rate_case(args.concurrency, args.seconds, 0 if args.request else 100, *args.request)
    with two_labs() as (a, b):
        # not "bench.toml": Tproxyd() writes its own default there
        configs = {lab.tmp: lab.write_config(config_text(lab), "bench-profile.toml")
                   for lab in (a, b)}
        for i in range(args.repeat):
            x, y = (a, b) if i % 2 == 0 else (b, a)
            before = [logged(x), logged(y)]
            r1, r2 = side_by_side(rate, Checkout(x, first, configs[x.tmp]),
                                  Checkout(y, second, configs[y.tmp]))
            if args.access_log:  # proof that each relay ran this config: it logged every one
                assert logged(x) - before[0] >= r1["done"] and logged(y) - before[1] >= r2["done"]
            r, c = ratios(r2, r1)
            rates.append(r)
            cpu.append(c)
            print(f"run {i}: A {r1['value']:6.0f} conn/s, B {r2['value']:6.0f} conn/s: x{r:.3f}",
                  file=sys.stderr, flush=True)
    print(f"A {first}\nB {second}\nside by side, {len(rates)} runs: conn/s B/A median "
          f"x{statistics.median(rates):.3f} (runs {sorted(round(r, 3) for r in rates)}); "
          f"relay CPU a connection B/A x{statistics.median(cpu):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--compare", nargs=2, metavar="PYTHON")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --compare: both relays at once on one core, in two labs")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--access-log", action="store_true", help="with [log] access to a file")
    p.add_argument("--hello", action="store_true",
                   help="each request is curl's recorded ClientHello (bench.sniffing's)")
    p.add_argument("--domains", type=int, default=0, metavar="N",
                   help="with bench.sniffing's `domains` routes of N names (and --hello)")
    args = p.parse_args(argv)
    args.request = (HELLO,) if args.hello or args.domains else ()

    def config_text(lab: Lab) -> str:
        extra = ONE_CLIENT + (f'[log]\naccess = "{lab.tmp}/access.log"\n' if args.access_log else "")
        return (lab.config(extra=extra, destinations=DESTINATIONS)
                + (named_routes(args.domains) if args.domains else ""))

    if args.compare and args.side_by_side:
        install()
        compare_side_by_side(args, config_text)
        return 0
    with Lab() as lab:
        config = lab.write_config(config_text(lab), "bench.toml")
        lab.run(lab.gw, *TPROXY, "apply", "-c", config)
        gen = loadgen(lab)
        if args.compare:
            compare(lab, config, gen, args)
            return 0

        plain = one_run(lab, config, gen, args.seconds, args.concurrency, request=args.request)
        n = plain["connections"]
        print(f"plain: {n} connections, {plain['generator']['conn_per_s']:.0f} conn/s; per "
              f"connection user {per_conn(plain['user'], n)}, system {per_conn(plain['system'], n)}")

        prof = one_run(lab, config, gen, args.seconds, args.concurrency, profile=True,
                       request=args.request)
        n = prof["connections"]
        st = pstats.Stats(f"{lab.tmp}/prof")
        calls = sum(v[1] for v in st.stats.values())  # primitive and recursive calls
        print(f"\ncprofile: {n} connections, {prof['generator']['conn_per_s']:.0f} conn/s; "
              f"{calls / max(n, 1):.0f} Python calls per connection; user "
              f"{per_conn(prof['user'], n)}, system {per_conn(prof['system'], n)} (inflated)")
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.top]
        print(f"{'own time/conn':>14} {'calls/conn':>10}  function")
        for (path, line, name), (_, ncalls, tottime, _, _) in rows:
            where = f"{os.path.basename(path)}:{line}" if path != "~" else "builtin"
            print(f"{tottime / max(n, 1) * 1e6:11.2f} us {ncalls / max(n, 1):10.2f}  {name} ({where})")

        if args.no_strace or not shutil.which("strace"):
            return 0
        out = f"{lab.tmp}/strace.txt"
        traced = one_run(lab, config, gen, 2, args.concurrency,
                         ("strace", "-c", "-f", "-o", out), request=args.request)
        n = traced["connections"]
        print(f"\nstrace: {n} connections; syscalls per connection")
        counts = strace_counts(out)
        for name, calls in sorted(counts.items(), key=lambda kv: -kv[1]):
            if calls / max(n, 1) >= 0.05:
                print(f"{calls / max(n, 1):8.2f}  {name}")
        total = sum(counts.values()) / max(n, 1)
        print(f"{total:8.2f}  in all")
        lab.run(lab.gw, *TPROXY, "down", "-c", config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
