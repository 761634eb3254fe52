"""The relay's SNIFFING step (issue 13): a TCP connection that a `domains` route could take waits
for the client's first bytes, reads the name in them, and only then is routed.

Entered only when RouteTable.wants_name() says the name could change the route: every other
connection is routed at accept, as without `domains`, and never comes here. The wait is bounded
twice: relay.sniff_timeout after accept (a server-first protocol, SMTP or an SSH server's
banner, waits that long and then routes without a name) and MAX_SNIFF bytes. The client's EOF
settles it too (what it sent routes, its FIN follows); its reset ends the connection
(client_reset). The bytes read are kept in the connection and sent on unchanged by whatever
the route connects to.

The connection was made at accept with a direct outbound socket, as any other (so an accepted
connection always has its outbound descriptor); a route through an upstream replaces it, a
reject route resets the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .connection import Connection, State
from .flow import SRC
from .sniff import MAX_SNIFF, NEED_MORE, NO_NAME, DatagramSniff, Result, StreamSniff, sniff_stream
from .sockopts import Address

if TYPE_CHECKING:
    from .loop import Relay

# New UDP sessions held for a name at once, per worker: each holds at most MAX_SNIFF bytes of
# datagrams, so 16 MiB in all; past it a new session routes without a name.
MAX_HELD = 1024


def read(conn: Connection) -> Result:
    """Read what the client has sent into conn.sniff, up to MAX_SNIFF bytes in all. Returns the
    answer: NEED_MORE (wait for more), a name or NO_NAME; EOF and the bound settle it. Raises
    OSError when the client's socket failed (a reset: conn.up.failed says whose)."""
    sniff = conn.sniff
    assert sniff is not None
    buffer = conn.pool.buffer  # the relay's shared buffer (CHUNK > MAX_SNIFF): no 16 KiB malloc
    while True:
        try:
            n = conn.client.recv_into(buffer, MAX_SNIFF - len(sniff.data))
        except BlockingIOError:
            return NEED_MORE
        except OSError:
            conn.up.failed = SRC
            raise
        if not n:
            return sniff.give_up()  # the FIN stays readable: the flow passes it on later
        result = sniff.feed(bytes(buffer[:n]))
        if result is not NEED_MORE:
            return result
        if len(sniff.data) >= MAX_SNIFF:
            return sniff.give_up()


class Sniffer:
    """The SNIFFING state's side of one relay: begin() at accept, then the loop calls
    on_readable() on the client's readiness and on_deadline() at sniff_timeout; both end in
    Relay.route_sniffed() once the answer is settled."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def begin(self, conn: Connection, candidates: int) -> None:
        """conn was just accepted (and counted): sniff before routing. The ClientHello is
        nearly always there already (at 8,000 conn/s, all but 81 of 44,000), so one read
        comes first and, when its bytes settle the name, routes at once: no StreamSniff, no
        copy, no wait."""
        relay = self.relay
        conn.state = State.SNIFFING
        conn.candidates = candidates
        first: bytes | None
        try:
            first = conn.client.recv(MAX_SNIFF)
        except BlockingIOError:
            first = None  # nothing yet (an idle relay accepts before the bytes come): wait
        except OSError as exc:
            conn.up.failed = SRC
            relay._end(conn, conn.failure_end(exc))
            return
        if first is not None:
            # b"": the client ended before a byte: no name (its FIN is passed on later)
            result = sniff_stream(first) if first else NO_NAME
            if result is not NEED_MORE or len(first) >= MAX_SNIFF:
                conn.first = first
                conn.domain = result if isinstance(result, str) else None
                relay.route_sniffed(conn)
                return
        conn.sniff = StreamSniff(relay.now + relay.settings.sniff_timeout)
        conn.deadline = conn.sniff.deadline
        if first:  # the start of a message, parsed above: the rest is waited for
            conn.sniff.seed(first)
        if not relay.watched(conn):
            return
        relay._schedule(conn, conn.deadline)

    def on_readable(self, conn: Connection) -> None:
        if self._read(conn):
            conn.last_active = self.relay.now

    def on_deadline(self, conn: Connection) -> None:
        """sniff_timeout is up: route with what was read (a server-first protocol: nothing)."""
        assert conn.sniff is not None
        conn.sniff.give_up()
        self._done(conn)

    def _read(self, conn: Connection) -> bool:
        """Read; route when settled. True: still SNIFFING."""
        try:
            result = read(conn)
        except OSError as exc:
            self.relay._end(conn, conn.failure_end(exc))
            return False
        if result is NEED_MORE:
            return True
        self._done(conn)
        return False

    def _done(self, conn: Connection) -> None:
        sniff = conn.sniff
        assert sniff is not None
        conn.sniff = None
        conn.first = bytes(sniff.data)
        conn.domain = sniff.name
        self.relay.route_sniffed(conn)


class DatagramSniffer:
    """The same step for UDP (QUIC): the first datagrams of a (client, destination) that a
    `domains` route could take are held, each decrypted once as it comes (DatagramSniff), until
    the Initial packets give the name or prove there is none, or sniff_timeout passes; then the
    session opens on its route (UdpRelay.open_sniffed) and they all go on, unchanged, in order.
    A datagram that is no QUIC version 1 Initial (DNS, a QUIC flow seen mid-way) settles it at
    once: no name, no wait. Without python3-cryptography every answer is no name."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pending: dict[tuple[Address, Address], DatagramSniff] = {}

    def hold(self, client: Address, dst: Address, data: bytes) -> bool:
        """For a datagram of a (client, dst) without a session: True when it is held (sent
        later with the others); False: open the session now, as without `domains`."""
        key = (client, dst)
        sniff = self.pending.get(key)
        relay = self.relay
        if sniff is None:
            routes = relay.routes
            if routes is None or client[0] in relay.upstream_ips:
                return False  # an upstream's own datagrams caught on their way go direct
            candidates = routes.candidates_text(dst[0], dst[1], client[0], "udp")
            if not candidates or not routes.wants_name(candidates) or len(self.pending) >= MAX_HELD:
                return False
            sniff = DatagramSniff(relay.now + relay.settings.sniff_timeout)
            if sniff.add(data) is not NEED_MORE:
                relay.udp.open_sniffed(client, dst, sniff)
                return True
            self.pending[key] = sniff
            relay.at(sniff.deadline, self._deadline, (key, sniff))
            return True
        if sniff.add(data) is not NEED_MORE:
            del self.pending[key]
            relay.udp.open_sniffed(client, dst, sniff)
        return True

    def held(self) -> int:
        """Datagrams held for a name now (the stats' udp_held)."""
        return sum(len(sniff.datagrams) for sniff in self.pending.values())

    def drop_all(self) -> int:
        """Forget every held session (the relay is closing): the number of datagrams dropped."""
        held = self.held()
        self.pending.clear()
        return held

    def _deadline(self, arg: object, when: float) -> None:
        key, sniff = arg  # type: ignore[misc]
        if self.pending.get(key) is sniff:
            del self.pending[key]
            sniff.give_up()
            self.relay.udp.open_sniffed(key[0], key[1], sniff)
