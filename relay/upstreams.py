"""What the relay keeps per upstream proxy: its address, its counters, and its active checks.

Addresses: an upstream's host is an IP literal or a DNS name. Names are resolved once, when
the worker starts (before its loop runs: getaddrinfo blocks, and nothing may block the loop),
and a name whose addresses change is picked up by the next reload, which starts new workers.
A name that did not resolve makes each attempt through that upstream fail at once ("unresolved"),
so its routes fail over as they would for a dead upstream.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass

from tproxyd.state.health import FAILED
from tproxyd.state.upstreams import Upstream

from .handshake import Handshake, HandshakeError
from .sockopts import SO_MARK, Address, set_reset_on_close


def resolve(upstream: Upstream) -> Address | None:
    """The address to connect to (the first getaddrinfo gives), None if the name did not resolve.
    Blocking for a DNS name: call it before the loop runs."""
    flags = socket.AI_NUMERICHOST if upstream.ip() is not None else 0
    try:
        infos = socket.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM,
                                   flags=flags)
    except OSError:
        return None
    host, port = infos[0][4][:2]
    return host, port


def outbound(address: Address, mark: int) -> socket.SocketType:
    """A socket towards an upstream: from the gateway's own address (no IP_TRANSPARENT, no
    bind: the upstream must see the gateway), with the relay's mark so it is not captured."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.SocketType(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class UpstreamCounters:
    """One upstream's counters in one worker, reported flat as upstream_<name>_<field>, with
    upstream_<name>_up (1 while this worker has it up). No field is "<word>_<another field>",
    so a key names one upstream and one field whatever `[a-z0-9_-]` the name has; and only the
    gauges end in _active and _up (the supervisor keeps no total of them)."""

    connections: int = 0  # tunnels opened through it
    failures: int = 0  # attempts that failed (connect, timeout, handshake), checks excluded
    declined: int = 0  # requests it answered with a refusal (a SOCKS5 error reply, HTTP 4xx/5xx)
    active: int = 0  # open connections through it now (a gauge)
    sent: int = 0  # bytes client -> server through it (bytes_up), of ended connections
    received: int = 0  # bytes server -> client (bytes_down), likewise
    checks: int = 0  # active checks run
    checks_failed: int = 0




class Check:
    """One active check of an upstream: a TCP connect plus the protocol's first exchange
    (Handshake with check=True), non-blocking, driven by the relay's selector. Its events and
    deadline come through on_event() and the relay's timer; close() runs once, never raises."""

    __slots__ = ("address", "connecting", "deadline", "handshake", "out", "sock", "started",
                 "upstream")

    def __init__(self, upstream: Upstream, address: Address | None, now: float):
        self.upstream, self.address, self.started = upstream, address, now
        self.deadline = now + upstream.connect_timeout
        self.handshake = Handshake(upstream, check=True)
        self.out = b""
        self.connecting = True
        self.sock: socket.SocketType | None = None

    def start(self, mark: int) -> None:
        """Open the socket and start connecting. Raises HandshakeError (or OSError) when the
        check fails at once (no address, connect refused); close() still releases it."""
        address = self.address
        if address is None:
            raise HandshakeError(FAILED, "unresolved", "its name did not resolve")
        self.sock = outbound(address, mark)
        err = self.sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise HandshakeError(FAILED, "connect", f"connect: {errno.errorcode.get(err, err)}")

    def on_event(self, mask: int) -> bool:
        """Readiness of the socket: True once the check passed. Raises HandshakeError."""
        assert self.sock is not None
        hs = self.handshake
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise HandshakeError(FAILED, "connect", f"connect: {errno.errorcode.get(err, err)}")
            self.connecting = False
            self.out = hs.start()
            if not hs.needs_exchange:
                return True
        try:
            if self.out:
                self.out = self.out[self.sock.send(self.out):]
            data = self.sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise HandshakeError(FAILED, "reset", f"check ({hs.state}): {exc.strerror}") from None
        if not data:
            raise hs.closed()
        step = hs.feed(data)
        self.out += step.send
        return step.done

    def wants_write(self) -> bool:
        return self.connecting or bool(self.out)

    def close(self) -> None:
        """Release the socket (reset: a check leaves no TIME_WAIT behind). Runs once, never raises."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                set_reset_on_close(self.sock)
            self.sock.close()
            self.sock = None
