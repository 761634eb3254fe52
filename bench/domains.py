"""Per-connection cost of routing by name: 100,000 `domains` entries against none.

    python -m bench.domains [--domains N] [--routes R] [--repeat K]

Pure CPU, no lab. Builds a RouteTable whose first R routes carry N random names between them
(two thirds "name and below", one third "=name") behind a last route without domains, then times
what the relay does for a TLS-looking connection once it has a name: candidates_text() at
accept, wants_name(), sniffed() on the name the parser returned, choose(). Names asked are one
third hits (a configured name or a name under one), two thirds misses, 2-5 labels long.
The baseline is the same call sequence against a table with no domains routes, where
wants_name() is false and the name is never read. Prints medians of K runs.

A run on the project's 2-core machine (Python 3.11, 2026-12-02, --repeat 5): no domains routes
0.77 us a connection, 1,000 names 2.24 us, 100,000 names in 10 routes 2.86 us (built in 0.34 s
once per config). The cost is per label of the asked name (sniffed() checks it, mask() does one
dict lookup per suffix), not per entry: 100x more entries cost well under 1 us more (cache misses
in a bigger dict). The same run times the parse of the ClientHello itself on the recorded test
data: 1.8 us for curl's 517-byte ClientHello, 1.8 us for a 1811-byte one, 4.1 us for openssl's
1568 bytes in four records, 1.8 us for curl's HTTP request, 65 us for RFC 9001's QUIC Initial
(key derivation and AES-GCM through python3-cryptography, once per new QUIC flow). What the
whole sniff costs the relay per connection: python -m bench.sniffing (README).
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from typing import List

from tproxyd.relay.sniff import sniff_datagrams, sniff_stream
from tproxyd.state.domains import sniffed
from tproxyd.state.routes import RouteTable
from tproxyd.state.upstreams import RouteRule

TLDS = ("com", "net", "org", "io", "de", "example")


def label(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(3, 12)))


def random_names(rng: random.Random, count: int) -> List[str]:
    return [".".join([label(rng) for _ in range(rng.randint(1, 2))] + [rng.choice(TLDS)])
            for _ in range(count)]


def build(rng: random.Random, domains: int, routes: int) -> List[RouteRule]:
    names = random_names(rng, domains)
    rules = [RouteRule(name=f"named{i}", via=("direct",),
                       domains=tuple(("=" if j % 3 == 0 else "") + n for j, n in enumerate(names[i::routes])))
             for i in range(routes if domains else 0)]
    return [*rules, RouteRule(name="rest", via=("direct",), ports=((443, 443),))]


def asked(rng: random.Random, table: RouteTable, count: int) -> List[str]:
    configured = [d.lstrip("=") for r in table.routes for d in r.domains or ()]
    out = []
    for _ in range(count):
        if configured and rng.random() < 1 / 3:
            out.append(rng.choice(("", "www.", "api.")) + rng.choice(configured))
        else:
            out.append(".".join([label(rng) for _ in range(rng.randint(1, 4))] + [rng.choice(TLDS)]))
    return out


def per_connection(table: RouteTable, names: List[str]) -> float:
    candidates, wants, choose = table.candidates_text, table.wants_name, table.choose
    start = time.perf_counter()
    for name in names:
        mask = candidates("198.51.100.10", 443, "192.168.1.2", "tcp")
        choose(mask, sniffed(name) if wants(mask) else None)
    return (time.perf_counter() - start) / len(names)


def parse_costs(repeat: int) -> None:
    """The sniffers on the recorded test data: what a name costs before the lookup above."""
    from tests.unit.tlsgen import capture, rfc9001_initial  # test data; bench runs from the checkout

    cases = [(name, sniff_stream, capture(name)) for name in (
        "curl-tls13.bin", "python-ssl-large.bin", "openssl-ffdhe8192-records.bin", "curl-http11.http")]
    cases.append(("rfc9001 QUIC Initial", lambda d: sniff_datagrams([d]), rfc9001_initial()))
    for name, parse, data in cases:
        number = 200 if "QUIC" in name else 5000
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                parse(data)
            runs.append((time.perf_counter() - start) / number)
        print(f"parse {name} ({len(data)} bytes): {statistics.median(runs) * 1e6:.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.domains")
    p.add_argument("--domains", type=int, default=100_000)
    p.add_argument("--routes", type=int, default=10)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--connections", type=int, default=100_000)
    args = p.parse_args()
    rng = random.Random(13)
    for count in (0, 1_000, args.domains):
        start = time.perf_counter()
        table = RouteTable(build(rng, count, args.routes))
        built = time.perf_counter() - start
        names = asked(rng, table, args.connections)
        runs = [per_connection(table, names) for _ in range(args.repeat)]
        print(f"{count:>7} domains in {args.routes if count else 0:>2} routes: "
              f"{statistics.median(runs) * 1e6:.2f} us a connection "
              f"(min {min(runs) * 1e6:.2f}, max {max(runs) * 1e6:.2f}); built in {built:.2f} s")
    parse_costs(args.repeat)


if __name__ == "__main__":
    main()
