"""The worker's list of open connections and UDP sessions for `tproxy top`, asked for on its
stats socket.

The stats socket answers on accept, without reading a request (a request read later would need
state per reader in the loop, and one sent early could still arrive after the answer). A reader
that wants the list says so by where it calls from: it binds its socket to an abstract address
starting with TOP_ADDRESS before connecting, and accept() hands that address to the relay. No
other descriptor is held: a relay short of descriptors answers both as it answers stats.

The list must be cheap with 10,000 connections open: one pass over them reads each one's byte
counts and keeps them for the next call; rows are made only for the TOP_ROWS that moved most
since the previous call (a threshold found by sorting the movements, plain ints, in C), and the
rate is that movement over the time between calls. Measured by bench/listing.py.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from itertools import islice, repeat
from operator import add, sub
from typing import Any, Iterable

from .accesslog import hostport

TOP_ROWS = 200  # rows a worker sends at most: a screen's worth, whatever is open
TOP_ADDRESS = b"\0tproxyd-top-"  # abstract addresses of listing readers start so
_names = itertools.count()


def wants_listing(peer_address: object) -> bool:
    """Whether an accepted stats reader asked for the connection list (see TOP_ADDRESS)."""
    return isinstance(peer_address, bytes) and peer_address.startswith(TOP_ADDRESS)


def listing_socket() -> socket.socket:
    """A Unix stream socket bound to a fresh abstract TOP_ADDRESS, to connect to a stats socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for _ in range(100):
            try:
                s.bind(TOP_ADDRESS + f"{os.getpid()}-{next(_names)}".encode())
                return s
            except OSError as exc:  # EADDRINUSE: another reader's name; take the next
                last = exc
        raise last
    except BaseException:
        s.close()
        raise


def ask_listing(stats_path: str, timeout: float = 2.0) -> dict:
    """The connection list of the relay whose stats socket is at stats_path."""
    with listing_socket() as s:
        s.settimeout(timeout)
        s.connect(stats_path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


class Snapshots:
    """Byte counts of the previous listing, for rates. Pure: the caller gives the clock."""

    def __init__(self) -> None:
        self.previous: dict[Any, int] = {}  # connection -> bytes both ways at the last call
        self.previous_up: dict[Any, int] = {}
        self.at: float | None = None

    def listing(self, conns: Iterable[Any], now: float, cap: int = TOP_ROWS,
                sessions: Iterable[Any] = ()) -> dict:
        """The cap connections and UDP sessions that moved most bytes since the last call
        (ever, for the first call or a new one), their rates over that time, and totals over
        all ("open" counts the TCP connections, the bytes and rate are of both).

        Whole-list steps run in C (comprehensions, map, sorting ints): with 10,000
        connections a call costs about 2 ms, where a Python loop with a heap cost 12."""
        tcp = list(conns)
        udp = list(sessions)
        cs = tcp + udp
        n, n_tcp = len(cs), len(tcp)
        ups = [c.up.bytes for c in tcp] + [s.bytes_up for s in udp]
        downs = [c.down.bytes for c in tcp] + [s.bytes_down for s in udp]
        totals = list(map(add, ups, downs))
        deltas = list(map(sub, totals, map(self.previous.get, cs, repeat(0, n))))
        if n > cap:
            kth = sorted(deltas)[n - cap]  # the cap-th largest movement
            chosen = [i for i, d in enumerate(deltas) if d > kth]
            chosen += islice((i for i, d in enumerate(deltas) if d == kth), cap - len(chosen))
        else:
            chosen = list(range(n))
        chosen.sort(key=deltas.__getitem__, reverse=True)
        since, previous_up = self.at, self.previous_up
        self.previous, self.previous_up, self.at = dict(zip(cs, totals)), dict(zip(cs, ups)), now
        interval = None if since is None else max(now - since, 1e-3)
        rows = []
        for i in chosen:
            conn, up, total, delta = cs[i], ups[i], totals[i], deltas[i]
            delta_up = up - previous_up.get(conn, 0)
            started = conn.started
            span = None if interval is None else max(min(interval, now - started), 1e-3)
            if i < n_tcp:
                proto, client, state = "tcp", conn.client_addr, conn.state.value
            else:
                proto, client, state = "udp", conn.client, session_state(conn)
            rows.append({
                "proto": proto, "client": hostport(client), "dst": hostport(conn.dst),
                "domain": getattr(conn, "domain", None),
                "route": getattr(conn, "route_name", "direct"),
                "via": getattr(conn, "via", "direct"),
                "state": state, "age": round(now - started, 1),
                "bytes_up": up, "bytes_down": total - up,
                "rate_up": None if span is None else round(delta_up / span),
                "rate_down": None if span is None else round((delta - delta_up) / span)})
        return {"open": n_tcp, "bytes_up": sum(ups), "bytes_down": sum(downs),
                "rate": None if interval is None else round(sum(deltas) / interval),
                "interval": interval, "shown": len(rows), "connections": rows}


def session_state(session: Any) -> str:
    """A UDP session's state column: "relaying", or its association's step through an
    upstream until that is ready."""
    assoc = getattr(session, "assoc", None)
    if assoc is None or assoc.state.value == "ready":
        return "relaying"
    return assoc.state.value
