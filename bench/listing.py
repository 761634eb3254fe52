"""What a `tproxy top` refresh costs a worker's loop: Snapshots.listing() over N open
connections (real Flow objects, a seventh of them moving) and the JSON of its answer, median
of K calls, in CPU time.

    python -m bench.listing [--connections N] [--repeat K]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

from tproxyd.relay.connection import State
from tproxyd.relay.flow import Flow, Pool
from tproxyd.relay.listing import Snapshots


class Conn:
    __slots__ = ("client_addr", "down", "dst", "started", "state", "up")


def connections(n: int) -> list[Conn]:
    a, b = socket.socketpair()
    pool, out = Pool(), []
    for i in range(n):
        c = Conn()
        c.up, c.down = Flow(a, b, False, pool), Flow(b, a, False, pool)
        c.up.bytes, c.down.bytes = i, 3 * i
        c.client_addr, c.dst = (f"10.0.{i >> 8 & 255}.{i & 255}", 40000 + i % 20000), ("198.18.2.1", 443)
        c.started, c.state = 0.0, State.RELAYING
        out.append(c)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.listing")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=21)
    args = p.parse_args(argv)
    conns = set(connections(args.connections))  # the relay keeps a set
    snaps = Snapshots()
    snaps.listing(conns, 0.0)
    costs = []
    for k in range(args.repeat):
        for j, c in enumerate(conns):
            if j % 7 == k % 7:
                c.down.bytes += 1000 + j
        t0 = time.thread_time()
        doc = snaps.listing(conns, 1.0 + k)
        json.dumps(doc)  # unixsock.reply's encoding, in the loop too
        costs.append(time.thread_time() - t0)
    print(f"{args.connections} connections, {doc['shown']} rows: median "
          f"{statistics.median(costs) * 1000:.2f} ms, max {max(costs) * 1000:.2f} ms of CPU a listing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
