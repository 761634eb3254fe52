"""One UDP session through a SOCKS5 upstream (UDP ASSOCIATE, RFC 1928 section 7).

A control TCP connection carries the UDP ASSOCIATE handshake and then lives exactly as long as
the session (closing either ends both: associations must not leak). Datagrams go from a UDP
socket of the gateway's own (never spoofed, relay mark) to the relay address the reply named
(BND.ADDR 0.0.0.0 or :: means the upstream's own), each behind the RFC 1928 UDP header. Until
the association is ready, a client's first datagrams wait in a small bounded queue.

    CONNECTING --connected--> HANDSHAKING --reply ok--> READY --control closed--> (session ends)
        any failure before READY: HandshakeError; the UDP relay tries the route's next upstream

No I/O on the datagrams themselves here: the UDP relay sends and receives them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import socket

from tproxyd.state.health import FAILED
from tproxyd.state.upstreams import RouteRule, Upstream

from . import socks5
from .connection import upstream_error
from .handshake import Handshake, HandshakeError, udp_relay_address
from .sockopts import Address
from .upstreams import outbound

PENDING_MAX = 16  # datagrams kept while the association opens; more are dropped (counted)


class AssocState(enum.Enum):
    CONNECTING = "connecting to the upstream"
    HANDSHAKING = "udp associate handshake"
    READY = "ready"
    CLOSED = "closed"


class Association:
    __slots__ = ("address", "attempt_started", "control", "deadline", "handshake", "out",
                 "pending", "relay_to", "route", "state", "tried", "udp", "upstream")

    def __init__(self, route: RouteRule) -> None:
        self.route = route
        self.tried: set[str] = set()
        self.pending: list[bytes] = []  # datagrams waiting for READY (wrapped when sent)
        self.state = AssocState.CLOSED
        self.control: socket.socket | None = None
        self.udp: socket.socket | None = None
        self.upstream: Upstream | None = None
        self.address: Address | None = None
        self.handshake: Handshake | None = None
        self.out = b""
        self.relay_to: Address | None = None
        self.attempt_started = self.deadline = 0.0

    def start(self, upstream: Upstream, address: Address | None, mark: int, now: float) -> None:
        """Begin an attempt through upstream (the previous attempt's sockets are closed first).
        Raises HandshakeError (or OSError, short of descriptors)."""
        self.release()
        self.upstream, self.address = upstream, address
        self.attempt_started, self.deadline = now, now + upstream.connect_timeout
        self.state, self.out, self.relay_to = AssocState.CONNECTING, b"", None
        if address is None:
            raise HandshakeError(FAILED, "unresolved", f"upstream {upstream.name}: its name "
                                                       "did not resolve")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        if mark:
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        # connected to the upstream for now: the kernel picks the address and port our
        # datagrams will come from, which the request names (servers may check them)
        self.udp.connect(address)
        host, port = self.udp.getsockname()[:2]
        self.handshake = Handshake(upstream, host, port, command=socks5.UDP_ASSOCIATE)
        self.control = outbound(address, mark)
        err = self.control.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise upstream_error(err, upstream.name, "connect")

    def on_control(self, mask: int) -> bool:
        """Readiness of the control connection before READY: True once the association is
        ready (the UDP socket then sends to the relay address). Raises HandshakeError."""
        assert self.control is not None and self.handshake is not None and self.upstream
        hs, name = self.handshake, self.upstream.name
        if self.state is AssocState.CONNECTING:
            err = self.control.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise upstream_error(err, name, "connect")
            self.state = AssocState.HANDSHAKING
            self.out = hs.start()
        try:
            if self.out:
                self.out = self.out[self.control.send(self.out):]
            data = self.control.recv(4096)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise upstream_error(exc.errno or 0, name, f"udp associate ({hs.state})") from None
        if not data:
            raise hs.closed()
        step = hs.feed(data)
        self.out += step.send
        if not step.done:
            return False
        assert step.bound is not None and self.address is not None and self.udp is not None
        self.relay_to = udp_relay_address(step.bound, self.address)
        try:
            self.udp.connect(self.relay_to)  # replies from anywhere else are filtered
        except OSError as exc:
            raise upstream_error(exc.errno or 0, name, "udp relay address") from None
        self.state = AssocState.READY
        return True

    def wants_write(self) -> bool:
        return self.state is AssocState.CONNECTING or bool(self.out)

    def release(self) -> None:
        """Close this attempt's sockets (not the queue). Never raises."""
        for sock in (self.control, self.udp):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self.control = self.udp = None
        self.state = AssocState.CLOSED
