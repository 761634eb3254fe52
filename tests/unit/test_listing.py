"""The worker's connection list for `tproxy top`: capped, sorted by bytes moved since the last
listing, rates over the time between listings, totals over every connection; and cheap."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

from tproxyd.relay.connection import State
from tproxyd.relay.listing import TOP_ROWS, Snapshots, ask_listing, wants_listing


class Conn:
    """What the listing reads of a relay Connection; hashed by identity, like one."""

    def __init__(self, i: int, up: int, down: int, started: float):
        self.up, self.down = SimpleNamespace(bytes=up), SimpleNamespace(bytes=down)
        self.client_addr = (f"10.0.{i >> 8 & 255}.{i & 255}", 40000 + i % 20000)
        self.dst = ("2001:db8::1", 443)
        self.started, self.state = started, State.RELAYING


def conn(i: int, up: int = 0, down: int = 0, started: float = 0.0) -> Conn:
    return Conn(i, up, down, started)


def test_the_first_listing_sorts_by_bytes_and_has_no_rates_yet():
    conns = [conn(i, up=i, down=10 * i) for i in range(5)]
    doc = Snapshots().listing(conns, now=10.0, cap=3)
    assert [r["bytes_down"] for r in doc["connections"]] == [40, 30, 20]
    assert doc["open"] == 5 and doc["shown"] == 3 and doc["rate"] is None
    assert doc["bytes_up"] == 10 and doc["bytes_down"] == 100
    first = doc["connections"][0]
    assert first["dst"] == "[2001:db8::1]:443" and first["client"] == "10.0.0.4:40004"
    assert first["route"] == first["via"] == "direct" and first["domain"] is None
    assert first["age"] == 10.0 and first["rate_up"] is None and first["state"] == "relaying"


def test_later_listings_sort_by_current_rate_not_by_total():
    big, busy = conn(1, down=10**9), conn(2, down=10)
    snaps = Snapshots()
    snaps.listing([big, busy], now=1.0)
    busy.down.bytes += 2000  # 2 s later: busy moved 2000 bytes, big nothing
    big.up.bytes += 0
    doc = snaps.listing([big, busy], now=3.0)
    first, second = doc["connections"]
    assert first["client"] == "10.0.0.2:40002" and first["rate_down"] == 1000
    assert second["rate_down"] == 0 and doc["rate"] == 1000 and doc["interval"] == 2.0


def test_a_connection_newer_than_the_last_listing_is_rated_over_its_own_age():
    snaps = Snapshots()
    snaps.listing([], now=0.0)
    new = conn(1, up=500, started=9.5)
    (row,) = snaps.listing([new], now=10.0)["connections"]
    assert row["rate_up"] == 1000


def test_ended_connections_are_forgotten():
    snaps = Snapshots()
    c = conn(1, up=5)
    snaps.listing([c], now=0.0)
    snaps.listing([], now=1.0)
    assert snaps.previous == {}


def test_the_list_is_capped_and_10000_connections_cost_under_5_ms():
    conns = [conn(i, up=i, down=i) for i in range(10_000)]
    snaps = Snapshots()
    snaps.listing(conns, now=0.0)
    for c in conns[::7]:
        c.down.bytes += 1000
    costs = []
    for k in range(5):
        t0 = time.perf_counter()
        doc = snaps.listing(conns, now=1.0 + k)
        costs.append(time.perf_counter() - t0)
    assert doc["open"] == 10_000 and doc["shown"] == TOP_ROWS == len(doc["connections"])
    # the median, with a margin for a shared machine: about 3 ms here (bench/listing.py)
    assert sorted(costs)[2] < 0.05


def test_only_a_reader_bound_to_a_listing_address_asks_for_the_list():
    assert wants_listing(b"\0tproxyd-top-12-0")
    assert not wants_listing("") and not wants_listing(b"\0other") and not wants_listing("/x")


def test_a_relay_answers_the_list_and_the_counters_on_its_stats_socket(tmp_path):
    from tests.unit.test_relay_loop import DEADLINE, Upstream, echo, running, wait_for
    from tproxyd.relay import unixsock

    up = Upstream(echo)
    with running(up.addr, tmp_path) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"x" * 100)
        assert c.recv(100)
        wait_for(lambda: relay.counters.active == 1, "the connection")
        doc = ask_listing(str(tmp_path / "relay.sock"))
        assert doc["open"] == 1 and doc["shown"] == 1 and doc["pid"] == os.getpid()
        (row,) = doc["connections"]
        assert row["dst"] == f"{up.addr[0]}:{up.addr[1]}" and row["bytes_up"] == 100
        assert unixsock.ask(str(tmp_path / "relay.sock"))["accepted"] == 1  # stats as before


def test_the_daemon_merges_its_workers_lists_busiest_first_and_forgets_ended_workers():
    from tproxyd.reconciler.daemon import Daemon

    def row(client: str, rate: int | None, total: int) -> dict:
        return {"client": client, "rate_up": rate, "rate_down": 0, "bytes_up": total,
                "bytes_down": 0}

    workers = [SimpleNamespace(proc=SimpleNamespace(pid=p), slot=i) for i, p in enumerate((7, 8))]
    fake = SimpleNamespace(supervisor=SimpleNamespace(workers=workers), listings={
        7: {"pid": 7, "open": 2, "udp_sessions": 1, "bytes_up": 5, "bytes_down": 6, "rate": 10,
            "cost_ms": 1.5, "connections": [row("a", 3, 1), row("b", None, 9)]},
        8: {"pid": 8, "open": 1, "udp_sessions": 0, "bytes_up": 1, "bytes_down": 2, "rate": 4,
            "cost_ms": 0.5, "connections": [row("c", 4, 0)]},
        9: {"pid": 9, "open": 50, "connections": [row("gone", 99, 99)]}})  # no longer a worker
    doc = Daemon.top(fake)
    assert [r["client"] for r in doc["connections"]] == ["c", "a", "b"]
    assert [r["worker"] for r in doc["connections"]] == [8, 7, 7]
    assert (doc["workers"], doc["open"], doc["udp_sessions"], doc["rate"]) == (2, 3, 1, 14)
    assert (doc["bytes_up"], doc["bytes_down"], doc["cost_ms"]) == (6, 8, 1.5)
    assert 9 not in fake.listings


class Sess:
    """What the listing reads of a relay UDP Session (relay/udp.py)."""

    def __init__(self, i: int, up: int, down: int, started: float, assoc=None):
        self.bytes_up, self.bytes_down, self.started, self.assoc = up, down, started, assoc
        self.client, self.dst = (f"10.0.9.{i}", 5000 + i), ("198.18.2.53", 53)
        self.route_name, self.via = "dns", "corp"


def test_udp_sessions_are_listed_with_connections_by_the_same_rule():
    from tproxyd.relay.association import AssocState

    tcp = [conn(1, up=10, down=100), conn(2, up=1, down=1)]
    udp = [Sess(1, up=60, down=600, started=1.0),
           Sess(2, up=0, down=0, started=2.0,
                assoc=SimpleNamespace(state=AssocState.HANDSHAKING))]
    snaps = Snapshots()
    doc = snaps.listing(tcp, now=5.0, sessions=udp)
    assert doc["open"] == 2 and doc["shown"] == 4
    assert (doc["bytes_up"], doc["bytes_down"]) == (71, 701)
    first, second = doc["connections"][:2]
    assert first["proto"] == "udp" and first["client"] == "10.0.9.1:5001"
    assert first["dst"] == "198.18.2.53:53" and first["state"] == "relaying"
    assert (first["route"], first["via"], first["age"]) == ("dns", "corp", 4.0)
    assert (first["bytes_up"], first["bytes_down"]) == (60, 600)
    assert second["proto"] == "tcp" and second["bytes_down"] == 100
    waiting = [r for r in doc["connections"] if r["client"] == "10.0.9.2:5002"]
    assert waiting[0]["state"] == "udp associate handshake"
    udp[0].bytes_down += 3000  # a second later: the session is the busiest by rate
    doc = snaps.listing(tcp, now=6.0, sessions=udp)
    assert doc["connections"][0]["proto"] == "udp" and doc["connections"][0]["rate_down"] == 3000
    assert doc["rate"] == 3000
