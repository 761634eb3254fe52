"""The relay: one thread, one selectors loop, every intercepted TCP connection carried to its
original destination.

Only BlockingIOError means "later"; any other error ends that one connection (reset both ways),
never the loop. Timers (connect and idle timeouts, accept pauses) live in one heap.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Final

from tproxyd.state.config import REDIRECT, TPROXY
from tproxyd.state.health import DECLINED, FAILED, NO_UPSTREAM, OK, UP, Decision, Health, decide
from tproxyd.state.routes import RouteTable
from tproxyd.state.upstreams import DIRECT, REJECT, RouteRule, Upstream

from . import accesslog, unixsock
from .connection import CLIENT, OPENING, READ, SERVER, WRITE, Connection, State, client_text
from .ends import RESOURCE_ERRORS, End
from .flow import SPLICE, Pool
from .handshake import Handshake, HandshakeError
from .listeners import open_listeners
from .listing import Snapshots, wants_listing
from .selector import Selector
from .sniffing import Sniffer
from .sockopts import (
    IP_BIND_ADDRESS_NO_PORT,
    SO_MARK,
    Address,
    is_local_address,
    original_dst_redirect,
    original_dst_tproxy,
    set_reset_on_close,
    set_transparent,
)
from .udp import UDP_CONTROL, UDP_IN, UDP_SESSION, Session, UdpRelay
from .upstreams import Check, UpstreamCounters, outbound, resolve

log = logging.getLogger("tproxyd.relay")

ACCEPTS_PER_EVENT = 64
# epoll's flags beyond the one asked for (errors, hang-ups) wake the other direction too
_NOT_IN: Final = ~select.EPOLLIN
_NOT_OUT: Final = ~select.EPOLLOUT
ACCEPT_PAUSE = 0.25  # seconds without accepting when short of descriptors: no 100% CPU spin
FDS_PER_CONNECTION = 6  # two sockets, two pipes of two ends each
LISTENER, WAKER, STATS, CHECK = "listener", "waker", "stats", "check"
# stats keys of the labelled counters (reconciler/metrics.py reads them back)
PATH_KEY = "connections|{}|{}|{}|{}"  # proto, route, via, end
VIA_BYTES_KEY = "bytes|{}|{}"  # direction, via


@dataclass
class Settings:
    port: int = 12345
    mode: str = TPROXY
    spoof_source: bool = True
    mark: int = 0  # SO_MARK on outbound sockets; 0: none (needs CAP_NET_ADMIN otherwise)
    sniff_timeout: float = 0.3  # the wait for a client's first bytes when a route needs a name
    max_connections: int = 16384
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    hosts: tuple[str, ...] = ("0.0.0.0", "::")
    transparent: bool = True  # IP_TRANSPARENT on listeners (tproxy mode)
    stats_path: str | None = None  # Unix socket answering the counters as JSON
    splice: bool = SPLICE
    udp: bool = False  # also relay UDP (tproxy mode only)
    udp_idle_timeout: float = 60.0
    max_udp_sessions: int = 16384
    max_pipe_memory: int = 256 << 20  # splice pipes' capacity, all flows together
    max_connections_per_client: int = 1024  # per client address
    max_udp_sessions_per_client: int = 1024
    upstreams: tuple[Upstream, ...] = ()  # [[upstream]]
    routes: tuple[RouteRule, ...] = ()  # [[route]], in file order
    access_log: str = accesslog.OFF  # "off", "stderr" or a file's path


@dataclass
class Counters:
    accepted: int = 0
    active: int = 0
    closed: int = 0
    bytes_up: int = 0  # client -> server, of ended connections (Relay.stats() adds open ones)
    bytes_down: int = 0  # server -> client, likewise
    accept_errors: int = 0
    fd_shortages: int = 0  # times every listener paused, short of descriptors
    internal_errors: int = 0  # bugs caught by the loop's last line of defence
    register_errors: int = 0  # connections the selector refused to watch (reset)
    log_suppressed: int = 0  # log lines left out by the one-a-second-per-kind limit
    udp_sessions: int = 0  # open now
    udp_sessions_opened: int = 0
    udp_failed: int = 0  # could not open the outbound socket
    udp_datagrams_up: int = 0
    udp_datagrams_down: int = 0
    udp_bytes_up: int = 0
    udp_bytes_down: int = 0
    udp_drops: int = 0  # datagrams we dropped: full buffers, unreadable, no session
    udp_kernel_drops: int = 0  # datagrams the kernel dropped on our full receive queues
    udp_gso_sends: int = 0  # sends that carried a burst of datagrams at once (relay/gso.py)
    access_log_dropped: int = 0  # access-log lines lost to a write error (full disk, full pipe)
    started: float = field(default_factory=time.time)
    # how TCP connections and UDP sessions ended, one count per End
    tcp_ends: dict[End, int] = field(default_factory=lambda: dict.fromkeys(End, 0))
    udp_ends: dict[End, int] = field(default_factory=lambda: dict.fromkeys(End, 0))
    # the same ends by path, (proto, route, via, end) -> count, and the payload bytes of ended
    # connections and sessions by (direction, via): the metrics' labels. Route and via are
    # names from the config, "direct" or "reject", never addresses: the keys are bounded.
    paths: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    via_bytes: dict[tuple[str, str], int] = field(default_factory=dict)

    def ended(self, proto: str, end: End, route: str = "direct", via: str = "direct") -> None:
        """A TCP connection (proto "tcp") or UDP session ("udp") ended: count it."""
        (self.tcp_ends if proto == "tcp" else self.udp_ends)[end] += 1
        key = (proto, route, via, end.value)
        self.paths[key] = self.paths.get(key, 0) + 1

    def moved(self, via: str, up: int, down: int) -> None:
        """Payload bytes of an ended connection or session through via (both protocols)."""
        b = self.via_bytes
        b["up", via] = b.get(("up", via), 0) + up
        b["down", via] = b.get(("down", via), 0) + down

    # The totals older readers (tproxy status, tests) use, derived from the ends.
    @property
    def refused(self) -> int:
        return self.tcp_ends[End.OVER_LIMIT]

    @property
    def loops(self) -> int:
        return self.tcp_ends[End.LOOP] + self.udp_ends[End.LOOP]

    @property
    def failed(self) -> int:
        """Connects that failed: refused, unreachable, timed out, or another error."""
        t = self.tcp_ends
        return (t[End.CONNECT_REFUSED] + t[End.UNREACHABLE] + t[End.CONNECT_TIMEOUT]
                + t[End.UPSTREAM_ERROR])

    @property
    def resets(self) -> int:
        return self.tcp_ends[End.CLIENT_RESET] + self.tcp_ends[End.SERVER_RESET]

    @property
    def connect_timeouts(self) -> int:
        return self.tcp_ends[End.CONNECT_TIMEOUT]

    @property
    def idle_timeouts(self) -> int:
        return self.tcp_ends[End.IDLE_TIMEOUT]

    @property
    def udp_expired(self) -> int:
        return self.udp_ends[End.UDP_EXPIRED]

    @property
    def udp_evicted(self) -> int:
        return self.udp_ends[End.UDP_EVICTED]

    @property
    def udp_icmp_errors(self) -> int:
        return self.udp_ends[End.UDP_ICMP]

    DERIVED = ("refused", "loops", "failed", "resets", "connect_timeouts", "idle_timeouts",
               "udp_expired", "udp_evicted", "udp_icmp_errors")

    def to_json(self) -> dict:
        """Flat name -> number: end_tcp_<end> and end_udp_<end> per End, the derived totals,
        every other counter, the pid, and the labelled ones as PATH_KEY and VIA_BYTES_KEY
        (names are [a-z0-9_-]: "|" cannot be part of one). Flat, so the daemon sums them and
        keeps the totals of ended workers like any other counter."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("tcp_ends", "udp_ends", "paths", "via_bytes")}
        out.update({name: getattr(self, name) for name in self.DERIVED})
        out.update({f"end_tcp_{end.value}": n for end, n in self.tcp_ends.items()})
        out.update({f"end_udp_{end.value}": n for end, n in self.udp_ends.items()})
        out.update({PATH_KEY.format(*key): n for key, n in self.paths.items()})
        out.update({VIA_BYTES_KEY.format(*key): n for key, n in self.via_bytes.items()})
        out["pid"] = os.getpid()
        return out


class Relay:
    def __init__(self, settings: Settings,
                 original_dst: Callable[[socket.SocketType], Address] | None = None):
        self.settings = settings
        self.original_dst = original_dst or (
            original_dst_redirect if settings.mode == REDIRECT else original_dst_tproxy)
        self.selector = Selector()
        self.counters = Counters()
        self.pool = Pool(settings.max_pipe_memory)  # the copy buffer and the pipe budget
        self.listeners: list[socket.socket] = []
        self.connections: set[Connection] = set()
        self.per_client: dict[str, int] = {}  # client address -> its open connections
        self.timers: list[tuple[float, int, Callable[[object, float], None], object]] = []
        self._seq = itertools.count()
        self.now = time.monotonic()
        self.running = False
        self.stop_requested = False  # stop() may come before run(): a SIGTERM right after start
        self.drain_requested = False
        self.draining = False
        self.iterations = 0  # loop turns: a test's proof that the loop is not spinning
        self.ports: set[int] = set()  # bound listener ports, for loop detection
        self.accepting = True
        self.paused = False  # every listener, stats included, waits out ACCEPT_PAUSE
        # A spare descriptor, given up only for what a full table would otherwise fail: the
        # outbound socket of a connection already accepted, a stats request. Accepting only
        # while it is held means an accepted connection always has its outbound socket.
        self._reserve: int | None = None
        self._last_log: dict[str, tuple[float, int]] = {}  # kind -> (last logged, left out)
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self.selector.register(self._waker_r, READ, (WAKER, None))
        self.stats_listener: socket.socket | None = None
        self.listing = Snapshots()  # `tproxy top`: byte counts of the last listing
        self.udp = UdpRelay(self)
        self.sniffer = Sniffer(self)
        # routes and upstreams: compiled and resolved once per config (a worker's life)
        self.routes = RouteTable(settings.routes) if settings.routes else None
        self.upstreams = {u.name: u for u in settings.upstreams}
        self.addresses = {u.name: resolve(u) for u in settings.upstreams}
        self.upstream_ips = {a[0] for a in self.addresses.values() if a is not None}
        self.health = Health(settings.upstreams, self.now)
        self.route_counts = {r.name: 0 for r in settings.routes}
        self.upstream_counts = {u.name: UpstreamCounters() for u in settings.upstreams}
        self.checks: set[Check] = set()
        self._check_timer: float | None = None
        self.access = accesslog.open_log(settings.access_log, self._access_log_dropped)

    # --- setup ---------------------------------------------------------------------------------

    def open(self, sockets: list[socket.socket] | None = None) -> list[Address]:
        """Start listening: on sockets handed over (by the daemon), or on new ones. Returns the
        TCP listeners' addresses."""
        if sockets is None:
            sockets = open_listeners(self.settings.port, self.settings.hosts,
                                     self.settings.transparent, self.settings.udp)
        for s in sockets:
            s.setblocking(False)
            if s.type == socket.SOCK_STREAM:
                # accepted sockets inherit TCP_NODELAY: one setsockopt here, none per connection
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.listeners.append(s)
                self.selector.register(s, READ, (LISTENER, s))
            else:
                self.udp.adopt(s)
        bound = [s.getsockname()[:2] for s in self.listeners]
        self._take_reserve()
        if self.settings.stats_path:
            self._open_stats(self.settings.stats_path)
        self.ports = {port for _, port in bound}
        self._schedule_checks()
        return bound

    def request_drain(self) -> None:
        """Safe from a signal handler: the loop drains at its next turn."""
        self.drain_requested = True
        self.wake()

    def _drain(self) -> None:
        """Stop taking new connections and datagrams; run until the open connections end.
        Our copies of the listeners, TCP and UDP, are closed: where the daemon kept its own (a
        reload on the same sockets) the next worker serves them; where it did not (new
        sockets), they leave the SO_REUSEPORT group so nothing new waits on them. The drain
        ends when the last connection and the last UDP session have."""
        self.draining = True
        self._pause_listening()
        for s in self.listeners:
            s.close()
        self.listeners.clear()
        self.udp.stop_listening()
        log.info("draining: %d connections and %d UDP sessions open", len(self.connections),
                 len(self.udp.sessions))

    def _open_stats(self, path: str) -> None:
        self.stats_listener = unixsock.listen(path)
        self.selector.register(self.stats_listener, READ, (STATS, self.stats_listener))

    def wake(self) -> None:
        """Make select() return now (from a signal handler or another thread)."""
        with contextlib.suppress(OSError):
            self._waker_w.send(b"\0")

    def wakeup_fd(self) -> int:
        """For signal.set_wakeup_fd: a signal wakes the loop."""
        return self._waker_w.fileno()

    def stop(self) -> None:
        """Safe from a signal handler, and before run(): run() then returns at once."""
        self.stop_requested = True
        self.running = False
        self.wake()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(), or until a drain has no connection or session left. A bug costs
        the connection it hit (events) or that one timer, never the relay; whatever still
        escapes (the selector failing) closes everything on its way out."""
        self.running = not self.stop_requested
        try:
            while self.running:
                timeout = None
                if self.timers:
                    timeout = max(0.0, self.timers[0][0] - time.monotonic())
                events = self.selector.poll(timeout)
                self.now = time.monotonic()
                self.iterations += 1
                # every key looked up before any handler runs, as the stdlib's select() does: a
                # handler may close a socket and a later one reuse its descriptor in this batch,
                # and the closed socket's event must reach its own (ended) connection
                keys = self.selector.keys
                batch = [(keys.get(fd), flags) for fd, flags in events]
                for key, flags in batch:
                    if key is None:
                        continue
                    # as select(): errors and hang-ups wake both directions
                    mask = ((WRITE if flags & _NOT_IN else 0)
                            | (READ if flags & _NOT_OUT else 0)) & key.events
                    try:
                        self._dispatch(key.data, mask)
                    except Exception:  # a bug costs one connection, never the relay
                        self._internal_error(key.data[0])
                self._run_timers()
                if self.access is not None:  # this turn's lines, in one write
                    self.access.flush()
                if self.drain_requested and not self.draining:
                    try:
                        self._drain()
                    except Exception:
                        self.draining = True  # still draining: no second attempt each turn
                        self._internal_error("drain")
                if self.draining and not self.connections and self.udp.idle():
                    self.running = False
        finally:
            self.close()

    def _internal_error(self, what: object) -> None:
        """The loop's last line of defence: count and log the bug, end the connection it hit."""
        self.counters.internal_errors += 1
        log.exception("internal error handling %s", what)
        if isinstance(what, Connection):  # the access log's list has no "internal" end
            self._end(what, End.UPSTREAM_ERROR)

    def _dispatch(self, data: tuple, mask: int) -> None:
        kind, obj = data
        if isinstance(kind, Connection):
            self._on_connection(kind, obj, mask)
        elif kind == LISTENER:
            self._accept(obj)
        elif kind == UDP_IN:
            self.udp.on_datagrams(obj)
        elif kind == UDP_SESSION:
            self.udp.on_reply(obj)
        elif kind == UDP_CONTROL:
            self.udp.on_control(obj, mask)
        elif kind == STATS:
            self._serve_stats(obj)
        elif kind == CHECK:
            self._on_check(obj, mask)
        else:
            self._drain_waker()

    def close(self) -> None:
        """Close listeners and every connection. One still carrying data is reset: a FIN would
        tell its peer the stream ended whole."""
        for conn in list(self.connections):
            self._end(conn, End.DRAINED)
        self.udp.close()
        for check in list(self.checks):
            self._end_check(check)
        if self.access is not None:  # after the last connection's line
            self.access.close()
        for s in self.listeners:
            self.unregister(s)
            s.close()  # the daemon's copy, if any, keeps the socket open for the next worker
        self.listeners.clear()
        self._release_reserve()
        if self.stats_listener is not None:
            self.unregister(self.stats_listener)
            self.stats_listener.close()
            self.stats_listener = None
            if self.settings.stats_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.settings.stats_path)

    def _drain_waker(self) -> None:
        try:
            while self._waker_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # --- timers --------------------------------------------------------------------------------

    def at(self, when: float, fn: Callable[[object, float], None], arg: object) -> None:
        heapq.heappush(self.timers, (when, next(self._seq), fn, arg))
        # Ended connections and superseded deadlines stay in the heap until they come up:
        # rebuild it when they are most of it, so a burst of short connections frees memory.
        if len(self.timers) > 4096 and len(self.timers) > 4 * (
                len(self.connections) + len(self.udp.sessions) + 16):
            self.timers = [t for t in self.timers if self._live_timer(t)]
            heapq.heapify(self.timers)

    def _live_timer(self, entry: tuple) -> bool:
        when, _, _, arg = entry
        if isinstance(arg, Connection):
            return arg.state is not State.CLOSED and when == arg.timer_at
        if isinstance(arg, Session):
            return self.udp.sessions.get((arg.client, arg.dst)) is arg and when == arg.timer_at
        if isinstance(arg, Check):
            return arg in self.checks
        return True  # accept pauses and the like

    def _run_timers(self) -> None:
        while self.timers and self.timers[0][0] <= self.now:
            when, _, fn, arg = heapq.heappop(self.timers)
            try:
                fn(arg, when)
            except Exception:  # that timer is lost, not the relay
                self._internal_error(arg)

    def _schedule(self, conn: Connection, when: float) -> None:
        """Each connection has one live timer; entries superseded by a later _schedule are
        skipped when they come up (a heap cannot cheaply delete)."""
        conn.timer_at = when
        self.at(when, self._check_deadlines, conn)

    def _check_deadlines(self, conn: object, when: float) -> None:
        """Connect deadline, then idle deadline, rescheduled lazily: traffic only moves
        last_active, it never touches the heap."""
        assert isinstance(conn, Connection)
        if conn.state is State.CLOSED or when != conn.timer_at:
            return
        if conn.state is State.SNIFFING:
            if self.now >= conn.deadline:
                self.sniffer.on_deadline(conn)
            else:
                self._schedule(conn, conn.deadline)
            return
        if conn.state is State.UPSTREAM_CONNECTING or conn.state is State.HANDSHAKING:
            if self.now >= conn.deadline:
                hs = conn.handshake
                step = "connect" if conn.state is State.UPSTREAM_CONNECTING else hs and hs.state
                self._upstream_failed(conn, HandshakeError(
                    FAILED, "timeout", f"upstream {conn.upstream}: no answer in the {step} step "
                                       f"within its connect_timeout"))
            else:
                self._schedule(conn, conn.deadline)
            return
        if conn.state is State.CONNECTING:
            if self.now >= conn.deadline:
                self.note("connect-timeout", f"connect to {conn.dst[0]} port {conn.dst[1]} "
                                             f"timed out after {self.settings.connect_timeout:g}s")
                self._end(conn, End.CONNECT_TIMEOUT)
                return
            self._schedule(conn, conn.deadline)
            return
        idle = self.settings.idle_timeout
        if not idle:
            return
        if self.now - conn.last_active >= idle:
            self._end(conn, End.IDLE_TIMEOUT)
        else:
            self._schedule(conn, conn.last_active + idle)

    # --- accepting -----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        family = int(listener.family)
        for _ in range(ACCEPTS_PER_EVENT):
            if not self._take_reserve():  # no descriptor to spare: the next one stays queued
                self._short_of_descriptors("cannot keep a spare descriptor")
                return
            try:
                # socket.accept() without its two enum conversions (the listener's family and
                # type): user CPU per connection 31.3 -> 29.6 us (bench.profile --compare, 9 runs)
                fd, addr = listener._accept()  # type: ignore[attr-defined]
                client = _socket_of(fd, family)
            except BlockingIOError:
                return
            except OSError as exc:
                self.counters.accept_errors += 1
                if exc.errno in RESOURCE_ERRORS:
                    self._short_of_descriptors(f"accept failed: {exc.strerror}")
                    return
                continue  # ECONNABORTED and kin: that one connection is gone already
            self.counters.accepted += 1
            self._start(client, addr[:2], family)

    def _take_reserve(self) -> bool:
        """Hold the spare descriptor (open it again if it was given up). False: none left."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def _release_reserve(self) -> bool:
        """Give the spare descriptor up for the call about to be retried; False: none held."""
        if self._reserve is None:
            return False
        os.close(self._reserve)
        self._reserve = None
        return True

    def _short_of_descriptors(self, why: str) -> None:
        """Pause every listener, the stats one included (a connection waiting there that
        cannot be accepted would be ready on every turn: a spin), for ACCEPT_PAUSE. What
        waits stays in the kernel's queues, not accepted and reset."""
        if self.paused:
            return
        self.paused = True
        self.counters.fd_shortages += 1
        self.warn("descriptors", f"{why}: short of descriptors, not accepting for "
                                 f"{ACCEPT_PAUSE}s ({len(self.connections)} connections open)")
        self._pause_listening()
        if self.stats_listener is not None:
            self.unregister(self.stats_listener)
        self.at(self.now + ACCEPT_PAUSE, self._resume_accepting, None)

    def _pause_listening(self) -> None:
        if self.accepting:
            self.accepting = False
            for s in self.listeners:
                self.unregister(s)

    def _resume_accepting(self, _: object, when: float) -> None:
        if self.paused:
            self.paused = False
            if self.stats_listener is not None:
                self.selector.register(self.stats_listener, READ, (STATS, self.stats_listener))
        if self.draining or self.accepting:
            return
        self.accepting = True
        for s in self.listeners:
            self.selector.register(s, READ, (LISTENER, s))

    def _refuse(self, client: socket.SocketType, end: End, route: str = "direct",
                via: str = "direct") -> None:
        """Reset a connection that never became a Connection, counted under end."""
        self.counters.ended("tcp", end, route, via)
        if self.access is not None:  # access-log hook
            self._access_log_refused(client, end, route, via)
        with contextlib.suppress(OSError):
            set_reset_on_close(client)
        client.close()

    def _start(self, client: socket.SocketType, client_addr: Address, family: int) -> None:
        if self.counters.active >= self.settings.max_connections:
            self.warn("max", f"max_connections ({self.settings.max_connections}) reached: "
                              "resetting new connections")
            self._refuse(client, End.OVER_LIMIT)
            return
        if self.per_client.get(client_addr[0], 0) >= self.settings.max_connections_per_client:
            self.warn("per-client",
                      f"{client_addr[0]} has max_connections_per_client "
                      f"({self.settings.max_connections_per_client}) open: resetting its new ones")
            self._refuse(client, End.OVER_LIMIT)
            return
        try:
            dst = self.original_dst(client)
        except (OSError, ValueError) as exc:  # ValueError: an unreadable SO_ORIGINAL_DST answer
            gone = isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.ECONNRESET)
            self.note("start", f"{client_text(client_addr)}: {exc}")
            self._refuse(client, End.CLIENT_RESET if gone else End.UPSTREAM_ERROR)
            return
        if dst[1] in self.ports and is_local_address(dst[0]):
            self.warn("loop", f"refused a loop: {client_addr[0]} port {client_addr[1]} "
                               f"asked for the relay itself ({dst[0]} port {dst[1]})")
            self._refuse(client, End.LOOP)
            return
        route = upstream = None
        candidates, sniffing = 0, False
        if self.routes is not None:
            candidates = self.routes.candidates_text(dst[0], dst[1], client_addr[0], "tcp")
            # a `domains` route could take it: route once the name is read (relay/sniffing.py)
            sniffing = bool(candidates) and self.routes.wants_name(candidates)
            if candidates and not sniffing:
                route = self.routes.choose(candidates)
        if route is not None and route.via[0] == DIRECT:  # the usual answer, no Decision made
            self.route_counts[route.name] += 1
        elif route is not None:
            decision = self._decide(route)
            if decision.action == REJECT:
                self.note("reject", f"{client_text(client_addr)} to {dst[0]} port {dst[1]}: "
                                    f"{decision}: reset")
                self._refuse(client, End.REJECTED, route.name, "reject")
                return
            if decision.action == NO_UPSTREAM:
                self.note("no-upstream", f"{client_text(client_addr)} to {dst[0]} port {dst[1]}: "
                                         f"{decision}: reset")
                self._refuse(client, End.UPSTREAM_ERROR, route.name, route.via[0])
                return
            upstream = decision.upstream  # None: direct
        try:
            client.setblocking(False)  # accept4 without SOCK_NONBLOCK: Python has no flags for it
            server = (self._outbound(family, client_addr) if upstream is None
                      else self._upstream_socket(upstream))
        except OSError as err:  # not `exc`: see tests/unit/test_native.py
            self.note("start", f"{client_text(client_addr)}: {err}")
            self._refuse(client, End.OVER_LIMIT if err.errno in RESOURCE_ERRORS
                         else End.UPSTREAM_ERROR)
            return
        conn = Connection(client, client_addr, server, dst, self.now, self.settings.splice,
                          self.pool)
        self.connections.add(conn)
        self.counters.active += 1
        self.per_client[client_addr[0]] = self.per_client.get(client_addr[0], 0) + 1
        conn.route = route  # None: no route matched (or not chosen yet: sniffing)
        if sniffing:
            self.sniffer.begin(conn, candidates)
        elif upstream is not None:
            self._try_upstream(conn, server, upstream)
        else:
            self._connect_direct(conn)

    def _decide(self, route: RouteRule) -> Decision:
        """Count a connection for its route and decide what carries it."""
        self.route_counts[route.name] += 1
        return decide(route, self.health, self.now)

    def route_sniffed(self, conn: Connection) -> None:
        """conn's sniff settled (relay/sniffing.py): its route, chosen with the name it asked
        for (conn.domain, None without one), carries it as _start's would have at accept."""
        assert self.routes is not None
        conn.state = State.CONNECTING
        route = conn.route = self.routes.choose(conn.candidates, conn.domain)
        if route is None:
            self._connect_direct(conn)
            return
        if route.via[0] == DIRECT:  # the usual answer, without a Decision made for it
            self.route_counts[route.name] += 1
            self._connect_direct(conn)
            return
        decision = self._decide(route)
        if decision.action == REJECT:
            self.note("reject", f"{conn.who} to {conn.target}: {decision}: reset")
            self._end(conn, End.REJECTED)
            return
        if decision.action == NO_UPSTREAM:
            self.note("no-upstream", f"{conn.who} to {conn.target}: {decision}: reset")
            conn.upstream = route.via[0]  # the access log's via, as for a reset at accept
            self._end(conn, End.UPSTREAM_ERROR)
            return
        if decision.upstream is None:
            self._connect_direct(conn)
            return
        conn.server.close()  # the direct socket made at accept: its descriptor is the upstream's
        try:
            server = self._upstream_socket(decision.upstream)
        except OSError as exc:
            self.note("start", f"{conn.who}: {exc}")
            self._end(conn, End.OVER_LIMIT if exc.errno in RESOURCE_ERRORS else End.UPSTREAM_ERROR)
            return
        self._try_upstream(conn, server, decision.upstream)

    def _connect_direct(self, conn: Connection) -> None:
        """Connect conn to its original destination, its first bytes with the connect."""
        try:
            conn.connect()
        except OSError as exc:
            self.note("start", f"{conn.who}: {exc}")
            self._end(conn, conn.failure_end(exc))
            return
        if not self.watched(conn):
            return
        if conn.state is not State.CONNECTING:
            conn.connected_at = self.now  # access log: connected inside connect()
        if conn.state is State.CONNECTING:
            conn.deadline = self.now + self.settings.connect_timeout
            self._schedule(conn, conn.deadline)
        elif self.settings.idle_timeout:
            self._schedule(conn, self.now + self.settings.idle_timeout)

    # --- through upstream proxies ----------------------------------------------------------------

    def _upstream_socket(self, name: str) -> socket.SocketType:
        """A socket towards upstream `name` (the spare descriptor covers a full table)."""
        address = self.addresses[name] or ("0.0.0.0", 0)  # unresolved: the attempt fails at once
        return self.with_reserve(lambda: outbound(address, self.settings.mark))

    def with_reserve(self, make: Callable[[], socket.SocketType]) -> socket.SocketType:
        """make() a socket; when the descriptor table is full, once more after giving up the
        spare descriptor, which is kept for exactly this."""
        try:
            return make()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._release_reserve():
                raise
            return make()

    def upstream_failed(self, name: str, exc: HandshakeError, started: float) -> None:
        """An attempt through upstream `name` (TCP or UDP) failed: tell Health and count it."""
        self.health.report(name, self.now, exc.outcome, exc.reason, started=started)
        counts = self.upstream_counts[name]
        if exc.outcome == DECLINED:
            counts.declined += 1
        else:
            counts.failures += 1

    def _try_upstream(self, conn: Connection, server: socket.SocketType, name: str) -> None:
        """Start conn's attempt through upstream `name` on server (a new socket), with the
        upstream's connect_timeout covering the connect and the whole handshake."""
        upstream = self.upstreams[name]
        try:
            # a sniffed name goes to an upstream with send_domain: it resolves the name itself
            host = upstream.target(conn.dst[0], conn.domain)
            conn.via_upstream(server, name, self.addresses[name],
                              Handshake(upstream, host, conn.dst[1]), self.now)
        except HandshakeError as exc:
            self._upstream_failed(conn, exc)
            return
        if not self.watched(conn):
            return
        conn.deadline = self.now + upstream.connect_timeout
        self._schedule(conn, conn.deadline)

    def _upstream_failed(self, conn: Connection, exc: HandshakeError) -> None:
        """conn's attempt through conn.upstream failed: tell Health, then try the route's next
        usable upstream for the same client connection (nothing reached the client yet), or
        reset the client when none is left. The last error is kept for the access log."""
        name = conn.upstream
        assert name is not None and conn.route is not None
        self.upstream_failed(name, exc, conn.attempt_started)
        conn.error = str(exc)
        conn.tried.add(name)
        if conn.masks[SERVER]:
            self.unregister(conn.server)
            conn.masks[SERVER] = 0
        client = f"client {conn.client_addr[0]} port {conn.client_addr[1]}"
        decision = decide(conn.route, self.health, self.now, conn.tried)
        if decision.upstream is None:
            self.note("upstream", f"{client} to {conn.target}: {exc}; {decision}: reset")
            self._end(conn, End.UPSTREAM_ERROR)
            return
        self.note("upstream", f"{client} to {conn.target}: {exc}; trying {decision.upstream}")
        try:
            server = self._upstream_socket(decision.upstream)
        except OSError as err:
            self.note("start", f"{client}: {err}")
            self._end(conn, End.OVER_LIMIT if err.errno in RESOURCE_ERRORS else End.UPSTREAM_ERROR)
            return
        self._try_upstream(conn, server, decision.upstream)

    def _tunnel_open(self, conn: Connection) -> None:
        """conn's upstream completed its handshake: the flows run from here as a direct one's."""
        name = conn.upstream
        assert name is not None
        conn.connected_at = self.now  # access log: the upstream's handshake is done
        self.health.report(name, self.now, OK, started=conn.attempt_started)
        counts = self.upstream_counts[name]
        counts.connections += 1
        counts.active += 1
        if self.settings.idle_timeout:
            self._schedule(conn, self.now + self.settings.idle_timeout)
        try:
            conn.send_early()
        except OSError as exc:
            self._end(conn, conn.failure_end(exc))

    # --- active checks -------------------------------------------------------------------------

    def _schedule_checks(self) -> None:
        """One timer for the earliest due check (a later one supersedes nothing: it is skipped
        when an earlier timer is already set)."""
        when = self.health.next_check()
        if when is None or self.draining:
            return
        if self._check_timer is not None and self._check_timer <= when:
            return
        self._check_timer = when
        self.at(when, self._run_checks, None)

    def _run_checks(self, _: object, when: float) -> None:
        if when != self._check_timer:
            return  # superseded by an earlier timer, which ran them
        self._check_timer = None
        if self.draining:
            return
        running = {c.upstream.name for c in self.checks}
        for name in self.health.due_checks(self.now):
            self.health[name].check_started(self.now)
            if name not in running:  # a slow check still running counts for this one
                self._start_check(self.upstreams[name])
        self._schedule_checks()

    def _start_check(self, upstream: Upstream) -> None:
        check = Check(upstream, self.addresses[upstream.name], self.now)
        self.upstream_counts[upstream.name].checks += 1
        try:
            check.start(self.settings.mark)
            assert check.sock is not None
            self.selector.register(check.sock, WRITE, (CHECK, check))
        except (HandshakeError, OSError) as exc:
            self._check_failed(check, exc)
            return
        self.checks.add(check)
        self.at(check.deadline, self._check_deadline, check)

    def _on_check(self, check: Check, mask: int) -> None:
        try:
            passed = check.on_event(mask)
        except HandshakeError as exc:
            if exc.outcome == DECLINED:  # it answered (an http check_target refused): alive
                passed = True
            else:
                self._check_failed(check, exc)
                return
        if passed:
            self.health[check.upstream.name].check_passed(self.now, self.now - check.started)
            self._end_check(check)
        else:
            assert check.sock is not None
            self.selector.modify(check.sock, READ | (WRITE if check.wants_write() else 0),
                                 (CHECK, check))

    def _check_deadline(self, check: object, when: float) -> None:
        assert isinstance(check, Check)
        if check in self.checks:
            self._check_failed(check, HandshakeError(FAILED, "timeout", "no answer within its "
                                                                        "connect_timeout"))

    def _check_failed(self, check: Check, exc: Exception) -> None:
        name = check.upstream.name
        reason = exc.reason if isinstance(exc, HandshakeError) else "error"
        self.health[name].check_failed(self.now, reason)
        self.upstream_counts[name].checks_failed += 1
        self.note(f"check-{name}", f"upstream {name}: active check failed: {exc}")
        self._end_check(check)

    def _end_check(self, check: Check) -> None:
        self.checks.discard(check)
        if check.sock is not None:
            self.unregister(check.sock)
        check.close()

    def _outbound(self, family: int, client_addr: Address) -> socket.SocketType:
        """A socket for the server side, made and bound; Connection.connect() connects it."""
        kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
        server = self.with_reserve(lambda: socket.SocketType(family, kind))  # see _socket_of
        try:
            if self.settings.mark:
                server.setsockopt(socket.SOL_SOCKET, SO_MARK, self.settings.mark)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.spoof_source:
                set_transparent(server)
                # the port is chosen at connect(), by the whole 4-tuple: a client address can
                # then make many more connections than one port range of binds
                server.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                server.bind((client_addr[0], 0))
        except BaseException:
            server.close()
            raise
        return server

    # --- connections ---------------------------------------------------------------------------

    def _on_connection(self, conn: Connection, side: int, mask: int) -> None:
        if conn.state is State.CLOSED:
            return  # already ended by the other side's event in this same batch
        if conn.state is State.SNIFFING:
            self.sniffer.on_readable(conn)
            return
        connecting = conn.state is State.CONNECTING
        upstream_step = conn.state in OPENING and not connecting
        try:
            conn.on_event(side, mask, self.now)
        except HandshakeError as failed:  # its own name: see tests/unit/test_native.py
            self._upstream_failed(conn, failed)
            return
        except OSError as exc:
            if conn.state is State.CONNECTING:  # the connect itself failed
                self.note("connect", f"{exc} (client {conn.client_addr[0]} port "
                                     f"{conn.client_addr[1]})")
            else:
                log.debug("connection %s -> %s ended: %s", conn.client_addr, conn.dst, exc)
            self._end(conn, conn.failure_end(exc))
            return
        if connecting:
            conn.connected_at = self.now  # access log: the server's handshake is done
        if connecting and 0 < self.settings.idle_timeout < self.settings.connect_timeout:
            # else the connect deadline's timer, when it fires, moves on to the idle deadline
            self._schedule(conn, self.now + self.settings.idle_timeout)
        elif upstream_step and conn.state is State.RELAYING:  # not CLOSED: a client gone
            self._tunnel_open(conn)
        if conn.state is State.CLOSED:
            self._end(conn, conn.fin_end())
        else:
            self._update(conn)

    def watched(self, conn: Connection) -> bool:
        """_update() for a connection just set up; False when epoll refused it (ENOMEM,
        ENOSPC): it is ended then, never leaked."""
        try:
            self._update(conn)
        except OSError as exc:
            self.counters.register_errors += 1
            self.warn("register", f"cannot watch a connection: {exc}; resetting it")
            self._end(conn, End.OVER_LIMIT)
            return False
        return True

    def _update(self, conn: Connection) -> None:
        """Tell the selector what each socket waits for, only where that changed."""
        client, server = conn.wanted_masks()
        masks = conn.masks
        if client != masks[CLIENT]:
            self._watch(conn, CLIENT, conn.client, client)
        if server != masks[SERVER]:
            self._watch(conn, SERVER, conn.server, server)

    def _watch(self, conn: Connection, side: int, sock: socket.SocketType, want: int) -> None:
        have = conn.masks[side]
        if not have:
            self.selector.register(sock, want, (conn, side))
        elif not want:
            self.selector.unregister(sock)
        else:
            self.selector.modify(sock, want, (conn, side))
        conn.masks[side] = want

    def _end(self, conn: Connection, end: End) -> None:
        """Release a connection and count how it ended. Ended by FINs, the last FIN goes out
        with the close; any other end resets both peers."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        masks = conn.masks
        if masks[CLIENT]:  # closed below, which takes them out of epoll (relay/selector.py)
            self.selector.forget(conn.client)
        if masks[SERVER]:
            self.selector.forget(conn.server)
        masks[CLIENT] = masks[SERVER] = 0
        ip = conn.client_addr[0]
        if self.per_client[ip] > 1:
            self.per_client[ip] -= 1
        else:
            del self.per_client[ip]
        # counted before the close: whoever sees the close then finds it counted
        c, via = self.counters, conn.via
        c.ended("tcp", end, conn.route_name, via)
        c.active -= 1
        c.closed += 1
        c.bytes_up += conn.up.bytes  # counted once, not per event
        c.bytes_down += conn.down.bytes
        c.moved(via, conn.up.bytes, conn.down.bytes)
        if conn.upstream is not None and conn.handshake is not None and conn.handshake.done:
            counts = self.upstream_counts[conn.upstream]
            counts.active -= 1
            counts.sent += conn.up.bytes
            counts.received += conn.down.bytes
        if end is End.UPSTREAM_ERROR and conn.error:
            log.debug("connection %s -> %s: upstream_error: %s", conn.client_addr, conn.dst,
                      conn.error)
        if self.access is not None:  # access-log hook
            self.access.write(accesslog.tcp_line(conn, end.value, self.now, time.time()))
        conn.close(reset=end not in (End.CLIENT_FIN, End.SERVER_FIN))

    def access_log_udp(self, session: Session, end: End) -> None:
        if self.access is not None:
            self.access.write(accesslog.udp_line(session, end.value, self.now, time.time()))

    def _access_log_refused(self, client: socket.SocketType, end: End, route: str, via: str) -> None:
        """A connection refused before it became a Connection (over a limit, a loop). Its
        addresses are asked for again here, only while the log is on; one already gone has
        none to log."""
        assert self.access is not None
        try:
            client_addr, dst = client.getpeername()[:2], self.original_dst(client)
        except (OSError, ValueError):
            return
        self.access.write(accesslog.line(time.time(), "tcp", client_addr, dst, route, via,
                                         0, 0, 0.0, None, end.value))

    def _access_log_dropped(self) -> None:
        self.counters.access_log_dropped += 1

    def unregister(self, sock: socket.SocketType) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    # --- stats and logs ------------------------------------------------------------------------

    def stats(self) -> dict:
        """The counters as JSON; bytes include those of the connections still open."""
        out = self.counters.to_json()
        pool = self.pool
        out.update(pipe_memory=pool.pipe_memory, pipes_small=pool.pipes_small,
                   pipes_refused=pool.pipes_refused, udp_held=self.udp.sniffer.held())
        for name, n in self.route_counts.items():
            out[f"route_{name}_connections"] = n
        for name, counts in self.upstream_counts.items():
            for f in fields(counts):
                out[f"upstream_{name}_{f.name}"] = getattr(counts, f.name)
            out[f"upstream_{name}_up"] = int(self.health[name].state == UP)
        if self.upstreams:  # not a count: the daemon merges the workers' (upstream_health.py)
            out["health"] = self.health.status(self.now)
        for conn in self.connections:
            out["bytes_up"] += conn.up.bytes
            out["bytes_down"] += conn.down.bytes
            if conn.state not in OPENING:  # its via is final only once open (failover)
                _add_via_bytes(out, conn.via, conn.up.bytes, conn.down.bytes)
            if conn.upstream is not None and conn.handshake is not None and conn.handshake.done:
                out[f"upstream_{conn.upstream}_sent"] += conn.up.bytes
                out[f"upstream_{conn.upstream}_received"] += conn.down.bytes
        for session in self.udp.sessions.values():
            _add_via_bytes(out, session.via, session.bytes_up, session.bytes_down)
        return out

    def connection_list(self) -> dict:
        """`tproxy top`'s view of this worker (relay/listing.py), with what it cost."""
        started = time.perf_counter()
        out = self.listing.listing(self.connections, self.now,
                                   sessions=self.udp.sessions.values())
        out.update(pid=os.getpid(), udp_sessions=len(self.udp.sessions),
                   cost_ms=round((time.perf_counter() - started) * 1000, 3))
        return out

    def _serve_stats(self, listener: socket.socket) -> None:
        """Answer one stats reader; short of descriptors, the spare one serves it."""
        try:
            peer, addr = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRORS or not self._release_reserve():
                self._short_of_descriptors(f"stats: {exc.strerror}")
                return
            try:
                peer, addr = listener.accept()
            except OSError:
                self._short_of_descriptors(f"stats: {exc.strerror}")
                return
        unixsock.reply(peer, self.connection_list() if wants_listing(addr) else self.stats())
        if not self._take_reserve():
            self._short_of_descriptors("cannot keep a spare descriptor")

    def warn(self, kind: str, message: str) -> None:
        """Warnings that could repeat per connection, at most one a second each."""
        self._limited(logging.WARNING, kind, message)

    def note(self, kind: str, message: str) -> None:
        """Information a client can cause at will (its connections failing): rate-limited like
        warnings, so no client grows the log."""
        self._limited(logging.INFO, kind, message)

    def _limited(self, level: int, kind: str, message: str) -> None:
        """At most one line a second per kind; the next line logged says how many were not."""
        last, left_out = self._last_log.get(kind, (-1e9, 0))
        if self.now - last < 1.0:
            self._last_log[kind] = (last, left_out + 1)
            self.counters.log_suppressed += 1
            return
        self._last_log[kind] = (self.now, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {self.now - last:.0f}s not logged)"
        log.log(level, message)


def _add_via_bytes(out: dict, via: str, up: int, down: int) -> None:
    """An open connection's or session's bytes into a stats reply's bytes|<direction>|<via>."""
    for direction, n in (("up", up), ("down", down)):
        key = VIA_BYTES_KEY.format(direction, via)
        out[key] = out.get(key, 0) + n


def read_stats(path: str, timeout: float = 2.0) -> dict:
    """The counters of the relay whose stats socket is at path."""
    return unixsock.ask(path, timeout)


def _socket_of(fd: int, family: int) -> socket.SocketType:
    """The socket object for an accepted descriptor (closed again if that fails).

    A connection's sockets are socket.SocketType (the C type, _socket.socket), not socket.socket:
    no Python __init__ and close() around the C ones, and `family` an int without an enum
    conversion. conn/s x1.029 (10 runs 1.021-1.037), relay CPU a connection x0.973 (`python -m
    bench.profile --compare OLD NEW --side-by-side`, 2026-12-03, compiled relay)."""
    try:
        return socket.SocketType(family, socket.SOCK_STREAM, 0, fd)
    except BaseException:
        os.close(fd)
        raise
