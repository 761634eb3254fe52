"""One relayed TCP connection and its explicit states.

    CONNECTING --connected--> RELAYING --client FIN passed on--> CLIENT_DONE --+
                                  |                                           +--> CLOSED
                                  +------server FIN passed on--> SERVER_DONE --+
    any state --error, reset, timeout--> CLOSED (reset both ways)

    through an upstream proxy (a route's via), instead of CONNECTING:
    UPSTREAM_CONNECTING --connected--> HANDSHAKING --reply ok--> RELAYING
        |                                  |
        +---- refused, timeout, bad reply: HandshakeError; the relay tries the route's next
              upstream on a new server socket (UPSTREAM_CONNECTING again) or resets the client

    when a route could depend on the name the client asks for (issue 13), first:
    SNIFFING --name, no name, EOF or sniff_timeout--> the states above, as the route says
                                                       (or CLOSED: a reject route's reset)

SNIFFING reads the client's first bytes (relay/sniffing.py); they are kept in `first` and sent
on unchanged: with the connect (direct), or ahead of anything else through the tunnel.
CONNECTING ends early, inside connect(), when the client's first bytes could be sent at once;
UPSTREAM_CONNECTING likewise, inside via_upstream(), when the greeting could. Through an
upstream, the client is watched while the tunnel opens, so that one which gives up
(a reset, or a FIN before any byte) ends at once instead of holding its upstream socket and its
slot until the tunnel opens or the deadline passes. What it sends meanwhile is kept after the
sniffed bytes (up to EARLY_LIMIT; past that it waits in the kernel) and goes to the server as
the tunnel opens (send_early()); the upstream's own bytes after its reply (step.rest) go to
the client.
Reaching CLOSED by FINs, the last FIN is still to send: close() sends it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import selectors
import socket

from tproxyd.state.health import FAILED
from tproxyd.state.upstreams import REJECT, RouteRule

from .ends import ConnectFailed, End, connect_end
from .flow import DST, SRC, Flow, Pool
from .handshake import Handshake, HandshakeError
from .sniff import StreamSniff
from .sockopts import Address, set_reset_on_close

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
CLIENT, SERVER = 0, 1


class State(enum.Enum):
    SNIFFING = "reading the client's first bytes for a name"
    CONNECTING = "connecting"
    UPSTREAM_CONNECTING = "connecting to an upstream proxy"
    HANDSHAKING = "handshaking with an upstream proxy"
    RELAYING = "relaying"
    CLIENT_DONE = "client done sending"  # half-closed: server -> client still flows
    SERVER_DONE = "server done sending"  # half-closed: client -> server still flows
    CLOSED = "closed"


OPENING = (State.CONNECTING, State.UPSTREAM_CONNECTING, State.HANDSHAKING)  # connect deadline
# Client bytes kept while an upstream's tunnel opens: a request or a TLS ClientHello fits; past
# this the client is no longer read (nor watched: a readable socket left unread would spin).
EARLY_LIMIT = 1 << 16
# a failed connect's errno -> the short reason an upstream's failure is counted under
_UPSTREAM_REASONS = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
                     errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable",
                     errno.ECONNRESET: "reset", errno.EPIPE: "reset"}


def upstream_error(err: int, upstream: str, during: str) -> HandshakeError:
    """An upstream's socket failed with errno err: the upstream is broken (FAILED)."""
    return HandshakeError(FAILED, _UPSTREAM_REASONS.get(err, "error"),
                          f"upstream {upstream}: {during}: {os.strerror(err)}")


def client_text(client: Address) -> str:
    """A client, for a log line (made only when one is written: not per connection)."""
    return f"connection from {client[0]} port {client[1]}"


class Connection:
    __slots__ = ("attempt_started", "candidates", "client", "client_addr", "connected_at",
                 "deadline", "domain", "down", "dst", "error", "first", "first_fin", "handshake",
                 "hs_out", "last_active", "masks", "pool", "route", "server", "sniff", "started",
                 "state", "timer_at", "tried", "up", "upstream", "use_splice")

    def __init__(self, client: socket.SocketType, client_addr: Address, server: socket.SocketType,
                 dst: Address, now: float, use_splice: bool, pool: Pool | None = None):
        self.client, self.server = client, server
        self.client_addr, self.dst = client_addr, dst
        self.pool, self.use_splice = pool or Pool(), use_splice
        self.up = Flow(client, server, use_splice, self.pool)  # client -> server
        self.down = Flow(server, client, use_splice, self.pool)  # server -> client
        self.state = State.CONNECTING
        self.last_active = now
        self.deadline = 0.0  # connect deadline while CONNECTING
        self.timer_at = 0.0  # when this connection's live timer fires (see Relay._schedule)
        self.masks = [0, 0]  # what the selector watches now, per side
        self.first_fin: int | None = None  # CLIENT or SERVER: who finished sending first
        # through an upstream: its route, the upstream tried now and those tried before
        self.route: RouteRule | None = None
        self.upstream: str | None = None
        self.tried: set[str] = set()
        self.handshake: Handshake | None = None
        self.hs_out = b""  # handshake bytes the upstream's socket did not take yet
        self.attempt_started = 0.0
        self.error = ""  # the last upstream's failure (reply code, status line) for the log
        # for the access log: when accepted, and when the server's handshake was done
        self.started = now
        self.connected_at: float | None = None
        # issue 13: the routes it could take (RouteTable.candidates), the sniff while SNIFFING,
        # the bytes it read (to send on first) and the name found (log, `top`, the upstream)
        self.candidates = 0
        self.sniff: StreamSniff | None = None
        self.first = b""
        self.domain: str | None = None

    @property
    def route_name(self) -> str:
        """The access log's and `tproxy top`'s `route`: the matching route's name, or "direct"."""
        return self.route.name if self.route is not None else "direct"

    @property
    def via(self) -> str:
        """The upstream tried last (carrying it, once the handshake is done), "reject" when a
        reject route took it after sniffing, or "direct"."""
        if self.upstream:
            return self.upstream
        return REJECT if self.route is not None and self.route.action == REJECT else "direct"

    @property
    def who(self) -> str:
        """The client, for a log line."""
        return client_text(self.client_addr)

    @property
    def target(self) -> str:
        """The destination for a log line: the sniffed name and the address, or the address."""
        where = f"{self.dst[0]} port {self.dst[1]}"
        return f"{self.domain} ({where})" if self.domain else where

    def wanted_masks(self) -> tuple[int, int]:
        """The events each socket should be watched for, computed from the state alone."""
        state = self.state
        if state is State.SNIFFING:
            return READ, 0
        if state is State.CONNECTING:
            return 0, WRITE
        if state is State.UPSTREAM_CONNECTING or state is State.HANDSHAKING:
            up = self.up  # the client: read for its early bytes, its FIN or its reset
            client = 0 if up.eof or up.pending >= EARLY_LIMIT else READ
            if state is State.UPSTREAM_CONNECTING:
                return client, WRITE
            return client, READ | (WRITE if self.hs_out else 0)
        if state is State.CLOSED:
            return 0, 0
        # read a flow's src while it is open and nothing waits for dst; write dst while
        # something does (backpressure)
        up, down = self.up, self.down
        return ((0 if up.eof or up.pending else READ) | (WRITE if down.pending else 0),
                (0 if down.eof or down.pending else READ) | (WRITE if up.pending else 0))

    def connect(self) -> None:
        """Start connecting to dst, with the bytes the client sent already (clients usually
        speak first). With such bytes in hand, TCP_QUICKACK off delays the handshake's last
        ACK so it rides on them: one packet less, and the server's accept finds the request
        there. Over a local link the handshake is over when connect() returns: the bytes go
        at once, and a send that succeeds proves the connection up (a socket still
        connecting says "would block"), so no wait for writability. Raises OSError."""
        if self.first:  # sniffed (at most MAX_SNIFF bytes: they fit the buffer)
            first = len(self.first)
            self.pool.buffer[:first] = self.first
            self.first = b""
        else:
            first = self.up.read_ahead()  # in the pool's buffer until send_ahead()
        if first:
            self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        err = self.server.connect_ex(self.dst)
        if err not in (0, errno.EINPROGRESS):
            raise self._failed(err)
        if first:
            try:
                sent = self.up.send_ahead(first)
            except OSError as exc:  # the connect's own error, reported by the send
                raise self._failed(exc.errno) from None
            if sent:
                self.state = State.RELAYING

    def via_upstream(self, server: socket.SocketType, upstream: str, address: Address | None,
                     handshake: Handshake, now: float) -> None:
        """Start (or, after a failed upstream, restart on a new server socket) the way through
        an upstream proxy at address: connect, then the handshake for dst. Nothing has moved
        yet, so the flows are made again around the new socket. Raises HandshakeError."""
        if server is not self.server:
            self.server.close()
            self.server = server
            early = self.up  # the client's early bytes and FIN stay the client's
            self.up = Flow(self.client, server, self.use_splice, self.pool)
            self.up.leftover, self.up.pending, self.up.eof = early.leftover, early.pending, early.eof
            self.down = Flow(server, self.client, self.use_splice, self.pool)
        if self.first:  # sniffed: ahead of the early bytes, into the tunnel once it opens
            self.up.leftover, self.up.pending = memoryview(self.first), len(self.first)
            self.first = b""
        self.upstream, self.handshake, self.hs_out = upstream, handshake, handshake.start()
        self.attempt_started = now
        self.state = State.UPSTREAM_CONNECTING
        if address is None:
            raise HandshakeError(FAILED, "unresolved",
                                 f"upstream {upstream}: its name did not resolve")
        err = server.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise upstream_error(err, upstream, "connect")
        # Over a local link the connect is usually done when connect() returns: greet at once
        # (a socket still connecting says "would block"; its writability then says when).
        try:
            self.hs_out = self.hs_out[server.send(self.hs_out):]
        except BlockingIOError:
            return
        except OSError as exc:
            raise upstream_error(exc.errno or 0, upstream, "connect") from None
        self.state = State.HANDSHAKING

    def _upstream_event(self, mask: int) -> None:
        """UPSTREAM_CONNECTING or HANDSHAKING: one step of the way to an open tunnel. Raises
        HandshakeError for anything that makes this upstream's attempt fail."""
        hs, name = self.handshake, self.upstream or ""
        assert hs is not None
        if self.state is State.UPSTREAM_CONNECTING:
            err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise upstream_error(err, name, "connect")
            self.state = State.HANDSHAKING  # hs_out holds the first bytes, from hs.start()
            mask = WRITE
        try:
            if mask & WRITE and self.hs_out:
                self.hs_out = self.hs_out[self.server.send(self.hs_out):]
            if not mask & READ:
                return
            data = self.server.recv(4096)  # a handshake's reply is small; the rest waits
        except BlockingIOError:
            return
        except OSError as exc:
            raise upstream_error(exc.errno or 0, name, f"handshake ({hs.state})") from None
        if not data:
            raise hs.closed()
        step = hs.feed(data)
        if step.send:
            self.hs_out += step.send
            with contextlib.suppress(BlockingIOError):
                self.hs_out = self.hs_out[self.server.send(self.hs_out):]
        if step.done:
            self.state = State.RELAYING
            if step.rest:  # the server spoke right after the reply: to the client first
                self.down.leftover = memoryview(step.rest)
                self.down.pending = len(step.rest)

    def _client_early(self) -> None:
        """The client is readable while the tunnel opens: keep its bytes (at most EARLY_LIMIT)
        for the server. A FIN after bytes is a half-close, passed on after them; a FIN before
        any byte means the client gave up: CLOSED (ended as client_fin). Its reset raises."""
        up = self.up
        try:
            data = self.client.recv(EARLY_LIMIT - up.pending)
        except BlockingIOError:
            return
        except OSError:
            up.failed = SRC  # failure_end(): client_reset
            raise
        if not data:
            up.eof = True
            if not up.pending:
                self.first_fin = CLIENT
                self.state = State.CLOSED
            return
        kept = bytes(up.leftover) + data if up.leftover is not None else data
        up.leftover, up.pending = memoryview(kept), len(kept)

    def send_early(self) -> None:
        """The tunnel just opened: send what the client sent during the handshake at once
        (no wait for writability: the socket is fresh), then its FIN if it came too."""
        up = self.up
        if up.pending:
            up.flush()
        if up.eof:
            self._pass_fins()

    def connected(self) -> None:
        """The server socket became writable while CONNECTING: did the connect succeed? With
        bytes to send, the send answers that (and sends them); else SO_ERROR does."""
        if self.up.pending:
            try:
                self.up.flush()
            except OSError as exc:
                raise self._failed(exc.errno) from None
        else:
            err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise self._failed(err)
        self.state = State.RELAYING

    def _failed(self, err: int) -> ConnectFailed:
        return ConnectFailed(err, f"connect to {self.dst[0]} port {self.dst[1]}: {os.strerror(err)}")

    def on_event(self, side: int, mask: int, now: float) -> None:
        """Move the bytes this readiness allows, then pass on FINs and advance the state.
        Raises OSError when a socket fails; the caller resets the connection."""
        if self.state is State.UPSTREAM_CONNECTING or self.state is State.HANDSHAKING:
            if side == CLIENT:
                self._client_early()
            else:
                self._upstream_event(mask)
            self.last_active = now
            return
        up, down = self.up, self.down
        if self.state is State.CONNECTING:
            # Nothing is read here: the selector says when the client sends more, or the
            # server speaks first (reading now would mostly hear "would block").
            self.connected()
            self.last_active = now
        elif side == CLIENT:
            if (up.pump() if mask & READ else 0) + (down.pump() if mask & WRITE else 0):
                self.last_active = now
        elif (up.pump() if mask & WRITE else 0) + (down.pump() if mask & READ else 0):
            self.last_active = now
        if up.eof or down.eof:
            self._pass_fins()

    def _pass_fins(self) -> None:
        """Carry each FIN on once everything before it was written. The connection's last FIN
        is left to close(), which sends it: both sockets were read to EOF, so nothing unread
        turns it into a reset, and a shutdown() is saved."""
        up, down = self.up, self.down
        if self.first_fin is None:  # both at once: the client's counts as first
            self.first_fin = CLIENT if up.eof else SERVER
        up_done, down_done = up.finished, down.finished
        if up_done and down_done:
            up.shut = down.shut = True
            self.state = State.CLOSED
        elif up_done:
            up.pass_fin()
            self.state = State.CLIENT_DONE
        elif down_done:
            down.pass_fin()
            self.state = State.SERVER_DONE

    def fin_end(self) -> End:
        """How a connection that reached CLOSED by FINs ended: who closed first."""
        return End.SERVER_FIN if self.first_fin == SERVER else End.CLIENT_FIN

    def failure_end(self, exc: OSError) -> End:
        """How an OSError raised by this connection ended it: a connect's error by its errno,
        otherwise a reset of the side whose socket failed."""
        if isinstance(exc, ConnectFailed):
            return connect_end(exc.errno)
        up, down = self.up, self.down
        if up.failed == SRC or down.failed == DST:
            return End.CLIENT_RESET
        if up.failed == DST or down.failed == SRC:
            return End.SERVER_RESET
        return End.UPSTREAM_ERROR

    def close(self, reset: bool) -> None:
        """Release both sockets and pipes. Runs once (later calls do nothing), never raises.
        reset: each peer sees RST (SO_LINGER 0) instead of FIN. In state CLOSED (both flows
        finished) this sends the last FIN."""
        self.state = State.CLOSED
        for sock in (self.client, self.server):
            if sock.fileno() < 0:
                continue
            if reset:
                with contextlib.suppress(OSError):
                    set_reset_on_close(sock)
            sock.close()
        self.up.close()
        self.down.close()
