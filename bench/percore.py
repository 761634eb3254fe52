"""Per core, tproxyd against HAProxy (issue 16): both on one core at the same time.

    python -m bench.percore [--seconds S] [--repeat N] [--splice]   (root: two labs)

The `connections` case of `python -m bench` (new connections of 100 bytes each way, 64 at
once, loadgen's two threads) for tproxyd in one lab and HAProxy 2.6 (one thread, transparent,
on the same nft rules) in another, run at the same time: both proxies pinned to CPU 0, both
generators and servers to CPU 1 (bench.__main__.side_by_side). Two saturated proxies on one
core get equal CPU time, so the ratio of their rates is the ratio of what one core of each
does, including the kernel work each one's syscalls carry, over the same seconds: the
machine's drift moves both alike. Each repeat swaps the labs. Prints each run and the median
ratio, with each proxy's CPU per connection.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.__main__ import Haproxy, Tproxyd, install, pin, rate_case, ratios, side_by_side, two_labs


def med(rows: list[tuple[float, float, float, float]], i: int) -> float:
    return statistics.median(row[i] for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.percore")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--splice", action="store_true", help="HAProxy with splice")
    args = p.parse_args(argv)
    install()
    if not pin(True):
        raise SystemExit("bench.percore needs two CPUs")
    rates: list[float] = []
    cpu: list[tuple[float, float]] = []
    split: list[tuple[float, float, float, float]] = []  # user and system, tproxyd then HAProxy
    rate = rate_case(64, args.seconds, 100)
    with two_labs() as (a, b):
        for i in range(args.repeat):
            x, y = (a, b) if i % 2 == 0 else (b, a)
            r_t, r_h = side_by_side(rate, Tproxyd(x), Haproxy(y, args.splice))
            rates.append(ratios(r_t, r_h)[0])
            cpu.append((r_t["relay_cpu_s"] / r_t["done"] * 1e6, r_h["relay_cpu_s"] / r_h["done"] * 1e6))
            split.append(tuple(r[k] / r["done"] * 1e6 for r in (r_t, r_h)  # type: ignore[misc]
                               for k in ("relay_user_s", "relay_sys_s")))
            print(f"run {i}: tproxyd {r_t['value']:6.0f} conn/s ({cpu[-1][0]:.1f} us CPU a "
                  f"connection), haproxy {r_h['value']:6.0f} ({cpu[-1][1]:.1f} us): "
                  f"x{rates[-1]:.3f}", file=sys.stderr, flush=True)
    print(f"per core, {len(rates)} runs side by side: tproxyd / haproxy"
          f"{'-splice' if args.splice else ''} conn/s median x{statistics.median(rates):.3f} "
          f"(runs {sorted(round(r, 3) for r in rates)}); CPU a connection "
          f"{statistics.median(c for c, _ in cpu):.1f} against "
          f"{statistics.median(h for _, h in cpu):.1f} us (user {med(split, 0):.1f} and system "
          f"{med(split, 1):.1f} against {med(split, 2):.1f} and {med(split, 3):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
