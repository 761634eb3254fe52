"""Transparent UDP in the relay's loop: sessions keyed by (client, original destination).

A datagram captured by TPROXY arrives on the UDP listener; recvmsg's ancillary data names its
original destination. The first datagram of a (client, destination) pair opens a session: an
outbound socket carrying the relay mark, bound (with spoof_source) to the client's address and
connected to the destination, so the kernel filters replies and reports ICMP errors to it.
Replies go back from a socket bound transparently to the destination's address and port, so
the client sees the answer come from the server it asked. Those reply sockets are shared by
every client of one destination; the kernel then also delivers the clients' next datagrams to
them (TPROXY finds a bound socket first), so they are read like the listener.

Bad input costs one datagram: any error on a datagram is counted and the loop goes on.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from collections import OrderedDict
from typing import TYPE_CHECKING

from tproxyd.state.health import FAILED, OK, decide
from tproxyd.state.upstreams import DIRECT, REJECT, RouteRule

from . import gso, socks5
from .association import PENDING_MAX, Association, AssocState
from .ends import End
from .handshake import HandshakeError
from .sniff import DatagramSniff
from .sniffing import DatagramSniffer
from .sockopts import (
    SO_MARK,
    Address,
    SockaddrError,
    is_local_address,
    parse_udp_ancillary,
    set_recv_origdst,
    set_transparent,
)

if TYPE_CHECKING:
    from .loop import Relay

log = logging.getLogger("tproxyd.relay")

MAX_DATAGRAM = 65536  # IPv4 carries at most 65,507 bytes of UDP payload, IPv6 65,527
CMSG_SPACE = socket.CMSG_SPACE(28) + socket.CMSG_SPACE(4)  # sockaddr_in6 + drop counter
BATCH = 64  # datagrams per readiness event: one busy socket cannot starve the others
UDP_IN, UDP_SESSION, UDP_CONTROL = "udp-in", "udp-session", "udp-control"
# a segmented send refused by the path (an MTU below a segment, a device without checksum
# offload): the session sends one datagram at a time from then on
GSO_REFUSED = {errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EMSGSIZE}


class Session:
    __slots__ = ("assoc", "bytes_down", "bytes_up", "client", "domain", "dst", "gso",
                 "last_active", "reply", "sock", "started", "timer_at")

    def __init__(self, client: Address, dst: Address, sock: socket.socket | None,
                 reply: socket.socket, now: float, assoc: Association | None = None):
        self.client, self.dst, self.sock, self.reply = client, dst, sock, reply
        self.assoc = assoc  # through a SOCKS5 upstream: sock is its UDP socket, when open
        self.last_active = now
        self.timer_at = 0.0
        self.started, self.bytes_up, self.bytes_down = now, 0, 0  # for the access log
        self.domain: str | None = None  # the name its first datagrams asked for (QUIC)
        self.gso = True  # bursts go out segmented (relay/gso.py) until a send refuses it

    @property
    def route_name(self) -> str:
        """The access log's `route`: a session through an upstream keeps its route."""
        return self.assoc.route.name if self.assoc is not None else "direct"

    @property
    def via(self) -> str:
        upstream = self.assoc.upstream if self.assoc is not None else None
        return upstream.name if upstream is not None else "direct"


def _path(route: RouteRule | None) -> tuple[str, str]:
    """The (route, via) labels of a datagram dropped before its session opened: via is the
    route's first choice (no upstream was tried)."""
    return ("direct", DIRECT) if route is None else (route.name, route.via[0])


class UdpRelay:
    def __init__(self, relay: Relay):
        self.relay = relay
        self.settings = relay.settings
        self.counters = relay.counters
        self.listeners: list[socket.socket] = []
        self.sessions: OrderedDict[tuple[Address, Address], Session] = OrderedDict()  # LRU first
        self.replies: dict[Address, tuple[socket.socket, int]] = {}  # dst -> (socket, users)
        self.per_client: dict[str, int] = {}  # client address -> its sessions
        self.kernel_drops: dict[int, int] = {}  # fd -> last SO_RXQ_OVFL value seen
        self.sniffer = DatagramSniffer(relay)  # new sessions waiting for their name

    # --- sockets -------------------------------------------------------------------------------

    def adopt(self, s: socket.socket) -> None:
        """Take a UDP listener (transparent, asking for original destinations)."""
        self.listeners.append(s)
        self.relay.selector.register(s, selectors.EVENT_READ, (UDP_IN, s))

    def stop_listening(self) -> None:
        """Draining: the listeners are closed, not just unwatched: an open one stays in its
        SO_REUSEPORT group and takes its share of new datagrams, which nobody would read (the
        daemon keeps its own copy where the next worker uses the same sockets). Sessions go
        on until they expire."""
        for s in self.listeners:
            self.relay.unregister(s)
            s.close()
        self.listeners.clear()

    def idle(self) -> bool:
        """No session, and none waiting for its name (routed at the latest at sniff_timeout,
        then carried): what a drain waits for."""
        return not self.sessions and not self.sniffer.pending

    def close(self) -> None:
        self.counters.udp_drops += self.sniffer.drop_all()  # held for a name: dropped, counted
        for session in list(self.sessions.values()):
            self._end(session, End.DRAINED)
        for s in self.listeners:
            self.relay.unregister(s)
            s.close()
        self.listeners.clear()

    def _reply_socket(self, dst: Address) -> socket.socket:
        entry = self.replies.get(dst)
        if entry is not None:
            self.replies[dst] = (entry[0], entry[1] + 1)
            return entry[0]
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_transparent(s)
            set_recv_origdst(s)
            s.bind(dst)
        except BaseException:
            s.close()
            raise
        self.replies[dst] = (s, 1)
        self.relay.selector.register(s, selectors.EVENT_READ, (UDP_IN, s))
        return s

    def _release_reply(self, dst: Address) -> None:
        s, users = self.replies[dst]
        if users > 1:
            self.replies[dst] = (s, users - 1)
            return
        del self.replies[dst]
        self.kernel_drops.pop(s.fileno(), None)
        self.relay.unregister(s)
        s.close()

    # --- client -> server ------------------------------------------------------------------------

    def on_datagrams(self, sock: socket.socket) -> None:
        """A listener or reply socket is readable: clients' datagrams, each to its session.
        A session's datagrams of this burst go out together (_send_burst), in order."""
        c = self.counters
        burst: dict[Session, list[bytes]] = {}  # direct sessions -> their datagrams, in order
        for _ in range(BATCH):
            try:
                data, anc, flags, client = sock.recvmsg(MAX_DATAGRAM, CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. an ICMP error queued on a reply socket
                c.udp_drops += 1
                log.debug("udp receive: %s", exc)
                continue
            try:
                dst, dropped = parse_udp_ancillary(anc)
            except SockaddrError as exc:
                c.udp_drops += 1
                log.debug("udp datagram with unreadable ancillary data: %s", exc)
                continue
            if dropped is not None:
                c.udp_kernel_drops += dropped - self.kernel_drops.get(sock.fileno(), 0)
                self.kernel_drops[sock.fileno()] = dropped
            if dst is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                c.udp_drops += 1
                continue
            session = self._session_for(client[:2], dst, data)
            if session is None:
                continue
            if session.assoc is not None:  # each in its SOCKS5 header
                self._send_up(session, data)
            elif session in burst:
                burst[session].append(data)
            else:
                burst[session] = [data]
        for session, datagrams in burst.items():
            if self.sessions.get((session.client, session.dst)) is session:
                self._send_burst(session, datagrams)
            else:  # evicted by a newer session in this burst
                c.udp_drops += len(datagrams)

    def _session_for(self, client: Address, dst: Address, data: bytes) -> Session | None:
        """The open session for a client's datagram, opened for it if need be; None when the
        datagram is held for a name (sniffing) or dropped (counted)."""
        key = (client, dst)
        session = self.sessions.get(key)
        if session is None:
            if self.sniffer.hold(client, dst, data):  # a domains route could take it: wait
                return None
            session = self._open_session(client, dst)
            if session is None or self.sessions.get(key) is not session:
                self.counters.udp_drops += 1
                return None
        else:
            self.sessions.move_to_end(key)
        return session

    def _send_burst(self, session: Session, datagrams: list[bytes]) -> None:
        """A direct session's datagrams of one burst towards its server: each run that
        relay/gso.py allows in one segmented send, the rest one by one."""
        runs = gso.runs(datagrams) if session.gso and len(datagrams) > 1 else [datagrams]
        for i, run in enumerate(runs):
            if not self._send_run(session, run):  # the session ended: the rest is lost with it
                self.counters.udp_drops += sum(map(len, runs[i + 1:]))
                return

    def _send_run(self, session: Session, run: list[bytes]) -> bool:
        """One run towards the server: segmented when it can be. False: the session ended."""
        if len(run) == 1 or not session.gso:
            for i, data in enumerate(run):
                if not self._send_up(session, data):
                    self.counters.udp_drops += len(run) - i - 1
                    return False
            return True
        c = self.counters
        session.last_active = self.relay.now
        assert session.sock is not None
        try:
            session.sock.sendmsg(run, gso.segment_size(len(run[0])))
        except BlockingIOError:
            c.udp_drops += len(run)  # the outbound buffer is full: UDP may drop, as we do
            return True
        except OSError as exc:
            if exc.errno in GSO_REFUSED:  # this path cannot take segments: one by one from now
                session.gso = False
                return self._send_run(session, run)
            self._icmp_error(session, exc)
            c.udp_drops += len(run)
            return False
        c.udp_gso_sends += 1
        self._sent_up(session, len(run), sum(map(len, run)))
        return True

    def open_sniffed(self, client: Address, dst: Address, sniff: DatagramSniff) -> None:
        """A new session's first datagrams, held until their name was read (or not): open it on
        the route the name chooses and send them on, unchanged and in order."""
        session = self._open_session(client, dst, sniff.name)
        if session is None or self.sessions.get((client, dst)) is not session:
            self.counters.udp_drops += len(sniff.datagrams)
            return
        session.domain = sniff.name
        for data in sniff.datagrams:
            self._send_up(session, data)

    def _send_up(self, session: Session, data: bytes) -> bool:
        """One datagram towards the server. False: the session ended (an ICMP error)."""
        c = self.counters
        session.last_active = self.relay.now
        if session.assoc is not None:
            self._forward_associated(session, data)
            return True
        assert session.sock is not None
        try:
            session.sock.send(data)
        except BlockingIOError:
            c.udp_drops += 1  # the outbound buffer is full: UDP may drop, and so do we
            return True
        except OSError as exc:
            self._icmp_error(session, exc)
            return False
        self._sent_up(session, 1, len(data))
        return True

    def _open_session(self, client: Address, dst: Address,
                      name: str | None = None) -> Session | None:
        c = self.counters
        try:
            loop = dst[1] in self.relay.ports and is_local_address(dst[0])
        except OSError:
            loop = False
        if loop:
            c.ended("udp", End.LOOP)
            self.relay.warn("udp-loop", f"dropped a loop: {client[0]} port {client[1]} sent "
                                         f"to the relay itself ({dst[0]} port {dst[1]})")
            return None
        relay = self.relay
        route = (relay.routes.match_text(dst[0], dst[1], client[0], "udp", name) if relay.routes
                 else None)
        if route is not None and route.action not in (DIRECT, REJECT) and client[0] in relay.upstream_ips:
            # An upstream's own datagram to a destination it relays for us, reached through
            # this gateway: the reply socket bound to that destination caught it (TPROXY's
            # socket match sees no interface). Through the upstream again it would loop; it
            # goes direct instead, as plain forwarding would have carried it.
            route = None
        if route is not None:
            # No session is kept for a datagram a route drops: each one is counted.
            relay.route_counts[route.name] += 1
            if route.action == REJECT:
                c.ended("udp", End.REJECTED, route.name, REJECT)
                relay.note("udp-reject", f"udp from {client[0]} port {client[1]} to {dst[0]} "
                                         f"port {dst[1]}: route {route.name}: reject: dropped")
                return None
        if self.per_client.get(client[0], 0) >= self.settings.max_udp_sessions_per_client:
            c.ended("udp", End.OVER_LIMIT, *_path(route))
            self.relay.warn("udp-per-client", f"{client[0]} has max_udp_sessions_per_client "
                                              f"({self.settings.max_udp_sessions_per_client}): "
                                              "dropping datagrams for new sessions")
            return None
        while len(self.sessions) >= self.settings.max_udp_sessions:
            _, oldest = self.sessions.popitem(last=False)
            self._close(oldest, End.UDP_EVICTED)
        if route is not None and route.action != DIRECT:
            return self._open_associated(client, dst, route)
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # out of descriptors: this datagram is dropped, the loop goes on
            c.udp_failed += 1
            self.relay.warn("udp-open", f"udp session {client} -> {dst}: {exc}")
            return None
        try:
            sock.setblocking(False)
            if self.settings.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.settings.mark)
            if self.settings.spoof_source:
                set_transparent(sock)
                sock.bind((client[0], 0))
            sock.connect(dst)  # replies from elsewhere are filtered; ICMP errors reach us
            reply = self._reply_socket(dst)
        except OSError as exc:
            sock.close()
            c.udp_failed += 1
            self.relay.warn("udp-open", f"udp session {client} -> {dst}: {exc}")
            return None
        session = Session(client, dst, sock, reply, self.relay.now)
        try:
            self.relay.selector.register(sock, selectors.EVENT_READ, (UDP_SESSION, session))
        except OSError as exc:  # ENOMEM, ENOSPC (max_user_watches)
            sock.close()
            self._release_reply(dst)
            c.udp_failed += 1
            self.relay.warn("udp-open", f"udp session {client} -> {dst}: {exc}")
            return None
        self._add(session)
        return session

    def _add(self, session: Session) -> None:
        c = self.counters
        self.sessions[(session.client, session.dst)] = session
        self.per_client[session.client[0]] = self.per_client.get(session.client[0], 0) + 1
        c.udp_sessions += 1
        c.udp_sessions_opened += 1
        self._schedule(session, self.relay.now + self.settings.udp_idle_timeout)

    # --- through a SOCKS5 upstream (UDP ASSOCIATE) -----------------------------------------------

    def _open_associated(self, client: Address, dst: Address, route: RouteRule) -> Session | None:
        c, relay = self.counters, self.relay
        decision = decide(route, relay.health, relay.now)
        if decision.upstream is None:
            c.ended("udp", End.UPSTREAM_ERROR, route.name, route.via[0])
            relay.note("udp-upstream", f"udp from {client[0]} port {client[1]} to {dst[0]} port "
                                       f"{dst[1]}: {decision}: dropped")
            return None
        try:
            reply = self._reply_socket(dst)
        except OSError as exc:
            c.udp_failed += 1
            relay.warn("udp-open", f"udp session {client} -> {dst}: {exc}")
            return None
        session = Session(client, dst, None, reply, relay.now, Association(route))
        self._add(session)
        self._attempt(session, decision.upstream)
        return session

    def _attempt(self, session: Session, name: str) -> None:
        """Start session's association through upstream `name`; its connect_timeout covers
        the connect and the handshake."""
        relay, assoc = self.relay, session.assoc
        assert assoc is not None
        self._unwatch(session)
        try:
            assoc.start(relay.upstreams[name], relay.addresses[name], self.settings.mark,
                        relay.now)
            session.sock = assoc.udp
            assert assoc.control is not None
            relay.selector.register(assoc.control, selectors.EVENT_WRITE, (UDP_CONTROL, session))
        except HandshakeError as exc:
            self._assoc_failed(session, exc)
            return
        except OSError as exc:  # out of descriptors, epoll full: this session is lost
            self.counters.udp_failed += 1
            relay.warn("udp-open", f"udp session {session.client} -> {session.dst}: {exc}")
            self._end(session, End.OVER_LIMIT)
            return
        relay.at(assoc.deadline, self._assoc_deadline, (session, assoc.attempt_started))

    def _unwatch(self, session: Session) -> None:
        assoc = session.assoc
        if assoc is not None:
            for sock in (assoc.control, assoc.udp):
                if sock is not None:
                    self.relay.unregister(sock)

    def on_control(self, session: Session, mask: int) -> None:
        """The control connection: the handshake until READY; after it, any byte or its end
        ends the session (the association is gone)."""
        assoc = session.assoc
        if assoc is None or self.sessions.get((session.client, session.dst)) is not session:
            return
        assert assoc.control is not None and assoc.upstream is not None
        if assoc.state is AssocState.READY:
            try:
                data = assoc.control.recv(512)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.relay.note("udp-upstream", f"upstream {assoc.upstream.name} closed the UDP "
                                                f"association of {session.client[0]}")
                self._end(session, End.UPSTREAM_ERROR)
            return  # bytes on a ready control connection mean nothing: ignored
        try:
            ready = assoc.on_control(mask)
        except HandshakeError as exc:
            self._assoc_failed(session, exc)
            return
        relay = self.relay
        if not ready:
            relay.selector.modify(assoc.control, selectors.EVENT_READ | (
                selectors.EVENT_WRITE if assoc.wants_write() else 0), (UDP_CONTROL, session))
            return
        name = assoc.upstream.name
        relay.health.report(name, relay.now, OK, started=assoc.attempt_started)
        relay.upstream_counts[name].connections += 1
        relay.selector.modify(assoc.control, selectors.EVENT_READ, (UDP_CONTROL, session))
        assert assoc.udp is not None
        relay.selector.register(assoc.udp, selectors.EVENT_READ, (UDP_SESSION, session))
        pending, assoc.pending = assoc.pending, []
        for data in pending:
            self._send_associated(session, data)

    def _assoc_deadline(self, arg: object, when: float) -> None:
        session, started = arg  # type: ignore[misc]
        assoc = session.assoc
        if (self.sessions.get((session.client, session.dst)) is session and assoc is not None
                and assoc.state is not AssocState.READY and assoc.attempt_started == started):
            self._assoc_failed(session, HandshakeError(
                FAILED, "timeout", f"upstream {assoc.upstream.name if assoc.upstream else '?'}: "
                                   "no UDP association within its connect_timeout"))

    def _assoc_failed(self, session: Session, exc: HandshakeError) -> None:
        """Tell Health, then try the route's next upstream, or end the session (its queued
        datagrams are dropped)."""
        relay, assoc = self.relay, session.assoc
        assert assoc is not None and assoc.upstream is not None
        name = assoc.upstream.name
        relay.upstream_failed(name, exc, assoc.attempt_started)
        assoc.tried.add(name)
        self._unwatch(session)
        assoc.release()
        decision = decide(assoc.route, relay.health, relay.now, assoc.tried)
        if decision.upstream is None:
            relay.note("udp-upstream", f"udp from {session.client[0]} to {session.dst[0]} port "
                                       f"{session.dst[1]}: {exc}; {decision}: dropped")
            self._end(session, End.UPSTREAM_ERROR)
            return
        relay.note("udp-upstream", f"{exc}; trying {decision.upstream}")
        self._attempt(session, decision.upstream)

    def _forward_associated(self, session: Session, data: bytes) -> None:
        assoc = session.assoc
        assert assoc is not None
        if assoc.state is AssocState.READY:
            self._send_associated(session, data)
        elif len(assoc.pending) < PENDING_MAX:
            assoc.pending.append(data)  # wrapped when sent: the upstream may change meanwhile
        else:
            self.counters.udp_drops += 1

    def _send_associated(self, session: Session, data: bytes) -> None:
        """data in the RFC 1928 UDP header of the session's upstream, to its relay address."""
        c = self.counters
        assert session.sock is not None
        try:
            session.sock.send(self._header(session) + data)
        except BlockingIOError:
            c.udp_drops += 1
            return
        except OSError as exc:
            self._icmp_error(session, exc)
            return
        self._sent_up(session, 1, len(data))

    @staticmethod
    def _header(session: Session) -> bytes:
        """The SOCKS5 UDP request header: the sniffed name when the upstream takes names
        (send_domain: it resolves the name itself), else the original destination's address."""
        upstream = session.assoc.upstream if session.assoc is not None else None
        host = session.dst[0] if upstream is None else upstream.target(session.dst[0],
                                                                       session.domain)
        return socks5.udp_header(host, session.dst[1])

    # --- server -> client ------------------------------------------------------------------------

    def on_reply(self, session: Session) -> None:
        """The server answered: read its datagrams of this burst, then send them to the client
        (segmented where relay/gso.py allows) from the destination's reply socket."""
        c = self.counters
        if self.sessions.get((session.client, session.dst)) is not session:
            return  # ended earlier in this batch of events
        assert session.sock is not None
        burst: list[bytes] = []
        failed: OSError | None = None
        for _ in range(BATCH):
            try:
                data = session.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNREFUSED: the server's ICMP port unreachable
                failed = exc
                break
            if session.assoc is not None:  # from the upstream's relay: unwrap
                try:
                    data = data[socks5.parse_udp(data).offset:]
                except socks5.Socks5Error:
                    c.udp_drops += 1
                    continue
            burst.append(data)
        for run in gso.runs(burst) if session.gso and len(burst) > 1 else [burst]:
            self._send_down_run(session, run)
        if failed is not None:
            self._icmp_error(session, failed)
            return
        session.last_active = self.relay.now
        self.sessions.move_to_end((session.client, session.dst))

    def _send_down_run(self, session: Session, run: list[bytes]) -> None:
        """Datagrams to the client from the destination's reply socket, segmented when they
        can be. A full buffer drops them, as UDP does."""
        c = self.counters
        if len(run) > 1 and session.gso:
            try:
                session.reply.sendmsg(run, gso.segment_size(len(run[0])), 0, session.client)
            except OSError as exc:  # BlockingIOError included
                if exc.errno not in GSO_REFUSED:
                    c.udp_drops += len(run)
                    return
                session.gso = False  # the client's path cannot take segments: one by one
            else:
                c.udp_gso_sends += 1
                self._sent_down(session, len(run), sum(map(len, run)))
                return
        for data in run:
            try:
                session.reply.sendto(data, session.client)
            except OSError:
                c.udp_drops += 1
                continue
            self._sent_down(session, 1, len(data))

    def _sent_up(self, session: Session, datagrams: int, size: int) -> None:
        """Count datagrams (size payload bytes in all) sent towards the server."""
        c = self.counters
        c.udp_datagrams_up += datagrams
        c.udp_bytes_up += size
        session.bytes_up += size

    def _sent_down(self, session: Session, datagrams: int, size: int) -> None:
        """Count datagrams (size payload bytes in all) sent to the client."""
        c = self.counters
        c.udp_datagrams_down += datagrams
        c.udp_bytes_down += size
        session.bytes_down += size

    def _icmp_error(self, session: Session, exc: OSError) -> None:
        log.debug("udp session %s -> %s ended: %s", session.client, session.dst,
                  errno.errorcode.get(exc.errno or 0, exc))
        self._end(session, End.UDP_ICMP)

    # --- expiry ----------------------------------------------------------------------------------

    def _schedule(self, session: Session, when: float) -> None:
        session.timer_at = when
        self.relay.at(when, self._check_idle, session)

    def _check_idle(self, session: object, when: float) -> None:
        assert isinstance(session, Session)
        if when != session.timer_at or self.sessions.get((session.client, session.dst)) is not session:
            return
        deadline = session.last_active + self.settings.udp_idle_timeout
        if self.relay.now >= deadline:
            self._end(session, End.UDP_EXPIRED)
        else:
            self._schedule(session, deadline)

    def _end(self, session: Session, end: End) -> None:
        if self.sessions.pop((session.client, session.dst), None) is session:
            self._close(session, end)

    def _close(self, session: Session, end: End) -> None:
        """Release a session already removed from the table, counted under end. Never raises."""
        via = session.via
        self.counters.ended("udp", end, session.route_name, via)
        self.counters.moved(via, session.bytes_up, session.bytes_down)
        self.relay.access_log_udp(session, end)  # access-log hook
        ip = session.client[0]
        if self.per_client[ip] > 1:
            self.per_client[ip] -= 1
        else:
            del self.per_client[ip]
        if session.assoc is not None:
            self._unwatch(session)
            session.assoc.release()  # the control connection too: no association outlives it
        elif session.sock is not None:
            self.relay.unregister(session.sock)
            session.sock.close()
        self._release_reply(session.dst)
        self.counters.udp_sessions -= 1
