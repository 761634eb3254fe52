"""The worker's list of open connections for `tproxy top`, on its own Unix socket.

The stats socket answers on accept without reading a request, and the relay keeps no state per
stats reader; a second socket next to it (listing_path) asks for the list instead, so neither
the stats protocol nor the loop changes.

The list must be cheap with 10,000 connections open: one pass over them reads each one's byte
counts and keeps them for the next call; rows are made only for the TOP_ROWS that moved most
since the previous call (a threshold found by sorting the movements, plain ints, in C), and the
rate is that movement over the time between calls. Measured by bench/listing.py.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from itertools import islice, repeat
from operator import add, sub
from typing import TYPE_CHECKING, Any, Iterable

from . import unixsock
from .accesslog import hostport

if TYPE_CHECKING:
    from .loop import Relay

TOP_ROWS = 200  # rows a worker sends at most: a screen's worth, whatever is open
RETRY = 0.25  # seconds the listener rests after a failed accept (out of descriptors)
TOP = "top"


def listing_path(stats_path: str) -> str:
    """relay-1-2-3.sock -> relay-1-2-3-top.sock"""
    root, ext = os.path.splitext(stats_path)
    return f"{root}-top{ext}"


class Snapshots:
    """Byte counts of the previous listing, for rates. Pure: the caller gives the clock."""

    def __init__(self) -> None:
        self.previous: dict[Any, int] = {}  # connection -> bytes both ways at the last call
        self.previous_up: dict[Any, int] = {}
        self.at: float | None = None

    def listing(self, conns: Iterable[Any], now: float, cap: int = TOP_ROWS) -> dict:
        """The cap connections that moved most bytes since the last call (ever, for the first
        call or a new connection), their rates over that time, and totals over all.

        Whole-list steps run in C (comprehensions, map, sorting ints): with 10,000
        connections a call costs about 2 ms, where a Python loop with a heap cost 12."""
        cs = list(conns)
        n = len(cs)
        ups = [c.up.bytes for c in cs]
        totals = list(map(add, ups, [c.down.bytes for c in cs]))
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
            rows.append({
                "client": hostport(conn.client_addr), "dst": hostport(conn.dst),
                "domain": getattr(conn, "domain", None),
                "route": getattr(conn, "route_name", "direct"),
                "via": getattr(conn, "via", "direct"),
                "state": conn.state.value, "age": round(now - started, 1),
                "bytes_up": up, "bytes_down": total - up,
                "rate_up": None if span is None else round(delta_up / span),
                "rate_down": None if span is None else round((delta - delta_up) / span)})
        return {"open": n, "bytes_up": sum(ups), "bytes_down": sum(totals) - sum(ups),
                "rate": None if interval is None else round(sum(deltas) / interval),
                "interval": interval, "shown": len(rows), "connections": rows}


class ListingServer:
    """The listing socket in the relay's selector: accept, answer, close, like stats."""

    def __init__(self, relay: Relay, path: str):
        self.relay = relay
        self.path = path
        self.snapshots = Snapshots()
        self.listener: socket.socket | None = unixsock.listen(path)
        self.registered = False
        self._register(None, 0.0)

    def _register(self, _: object, when: float) -> None:
        if self.listener is not None and not self.registered:
            self.relay.selector.register(self.listener, selectors.EVENT_READ, (TOP, self))
            self.registered = True

    def serve(self) -> None:
        assert self.listener is not None
        try:
            peer, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError:  # out of descriptors: rest a while rather than spin on readiness
            self.relay.unregister(self.listener)
            self.registered = False
            self.relay.at(self.relay.now + RETRY, self._register, None)
            return
        t0 = time.perf_counter()
        doc = self.snapshots.listing(self.relay.connections, self.relay.now)
        doc.update(pid=os.getpid(), udp_sessions=len(self.relay.udp.sessions),
                   cost_ms=round((time.perf_counter() - t0) * 1000, 3))
        unixsock.reply(peer, doc)

    def close(self) -> None:
        """Runs once, never raises."""
        if self.listener is None:
            return
        self.relay.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
