"""One upstream handshake as a state machine without I/O: the connection feeds it the bytes it
received and sends what it returns. The relay's connection owns the socket, the deadline
(upstream.connect_timeout) and the selector; this owns the protocol and the verdict.

    hs = Handshake(upstream, "203.0.113.5", 443)
    send(hs.start())
    ... on each read:  step = hs.feed(data)  -> send(step.send); if step.done: tunnel step.rest
    ... HandshakeError: step.outcome (health.FAILED / DECLINED) and step.reason for counters,
        str() for the log (the SOCKS5 reply's name or the HTTP status line)

The states are those the connection reports (GREETING, AUTH, REQUEST, DONE); an active check
is a handshake with check=True, which ends after authentication (socks5) or after the CONNECT
to the upstream's check_target (http; with none, the check is the TCP connect alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from tproxyd.state.health import DECLINED, FAILED
from tproxyd.state.upstreams import HTTP, Upstream, ip_literal

from . import httpconnect, socks5

GREETING, AUTH, REQUEST, DONE = "greeting", "auth", "request", "done"


class HandshakeError(Exception):
    """The handshake failed. outcome: FAILED (the upstream is broken: mark it down) or
    DECLINED (it answered, refusing this request); reason: a short word for counters."""

    def __init__(self, outcome: str, reason: str, message: str):
        super().__init__(message)
        self.outcome = outcome
        self.reason = reason


@dataclass(frozen=True)
class Step:
    send: bytes = b""  # to send to the upstream now
    done: bool = False  # the tunnel is open (or the check passed)
    rest: bytes = b""  # done: bytes that came after the reply; they belong to the tunnel
    bound: tuple[str, int] | None = None  # done, socks5: BND.ADDR, BND.PORT of the reply


class Handshake:
    def __init__(self, upstream: Upstream, host: str = "", port: int = 0,
                 command: int = socks5.CONNECT, check: bool = False):
        """host, port: the destination (an IP literal, or a name the upstream resolves).
        command: socks5.CONNECT or socks5.UDP_ASSOCIATE (host:port then say where the
        datagrams will come from; zeros where the upstream allows). check: an active check."""
        self.upstream = upstream
        self.host, self.port, self.command, self.check = host, port, command, check
        self.state = GREETING
        self._buf = b""
        self._with_password = bool(upstream.username)
        if upstream.type == HTTP:
            if check:
                target = upstream.check_target
                if target:
                    self.host, _, port_text = target.rpartition(":")
                    self.host = self.host.strip("[]")
                    self.port = int(port_text)
            self.state = REQUEST

    @property
    def done(self) -> bool:
        """The tunnel is open (or the check passed)."""
        return self.state == DONE

    @property
    def needs_exchange(self) -> bool:
        """False for an http check without check_target: the TCP connect is the whole check."""
        return not (self.upstream.type == HTTP and self.check and not self.upstream.check_target)

    def start(self) -> bytes:
        """The first bytes to send once the TCP connection to the upstream is up."""
        if self.upstream.type == HTTP:
            if not self.needs_exchange:
                self.state = DONE
                return b""
            password = self.upstream.password.reveal() if self.upstream.password else ""
            return httpconnect.connect_request(self.host, self.port, self.upstream.username, password)
        return socks5.greeting(self._with_password)

    def feed(self, data: bytes) -> Step:
        """Bytes received from the upstream; returns what to do next. Raises HandshakeError."""
        if self.state == DONE:
            raise RuntimeError("the handshake is over: the bytes belong to the tunnel")
        self._buf += data
        try:
            if self.upstream.type == HTTP:
                return self._http()
            return self._socks5()
        except socks5.Socks5Error as exc:
            raise HandshakeError(FAILED, exc.reason, f"socks5 {self.state}: {exc}") from None
        except httpconnect.HttpConnectError as exc:
            raise HandshakeError(FAILED, exc.reason, f"http CONNECT: {exc}") from None

    def closed(self) -> HandshakeError:
        """The error for an upstream that closed the connection before the handshake ended."""
        return HandshakeError(FAILED, "closed", f"the upstream closed the connection during "
                                                f"the {self.state} step")

    def _named(self) -> str:
        """For a refusal's message: the name asked for (issue 13's sniffed names: the address
        alone would not say which site was refused), nothing for an address."""
        if not self.host or ip_literal(self.host) is not None:
            return ""
        return f" (CONNECT {self.host}:{self.port})"

    def _take(self, size: int) -> None:
        self._buf = self._buf[size:]

    def _pending(self) -> Step:
        # Nothing to send yet. The buffer stays small: a SOCKS5 message is at most 262 bytes
        # and its parser answers as soon as one is complete; HTTP's stops at 16 KiB.
        return Step()

    def _socks5(self) -> Step:
        if self.state == GREETING:
            choice = socks5.parse_method(self._buf, self._with_password)
            if choice is None:
                return self._pending()
            self._take(choice.size)
            if choice.method == socks5.USERNAME_PASSWORD:
                self.state = AUTH
                assert self.upstream.password is not None  # the loader pairs them
                return Step(send=socks5.auth_request(self.upstream.username,
                                                     self.upstream.password.reveal()))
            return self._request()
        if self.state == AUTH:
            if socks5.parse_auth(self._buf) is None:
                return self._pending()
            self._take(2)
            return self._request()
        reply = socks5.parse_reply(self._buf)
        if reply is None:
            return self._pending()
        if not reply.ok:
            # The upstream answered: a refusal of this request, not a broken upstream.
            raise HandshakeError(DECLINED, reply.name, f"socks5 reply: {reply.name}{self._named()}")
        self.state = DONE
        return Step(done=True, rest=self._buf[reply.size:], bound=(reply.host, reply.port))

    def _request(self) -> Step:
        if self.check:
            self.state = DONE
            return Step(done=True, rest=self._buf)
        self.state = REQUEST
        step = Step(send=socks5.request(self.command, self.host, self.port))
        if self._buf:  # a reply cannot come before the request: garbage
            raise HandshakeError(FAILED, "protocol", "socks5: bytes before the request was sent")
        return step

    def _http(self) -> Step:
        response = httpconnect.parse_response(self._buf)
        if response is None:
            return Step()
        if response.auth_failed:
            raise HandshakeError(FAILED, "auth_failed", f"http CONNECT: authentication failed: "
                                                        f"{response.status_line}")
        if not response.ok:
            raise HandshakeError(DECLINED, f"status {response.code}",
                                 f"http CONNECT: {response.status_line}{self._named()}")
        self.state = DONE
        return Step(done=True, rest=self._buf[response.size:])


def udp_relay_address(bound: tuple[str, int], upstream_peer: tuple[str, int]) -> tuple[str, int]:
    """Where to send a UDP association's datagrams: BND.ADDR:BND.PORT of the reply, except that
    an unspecified address (0.0.0.0, ::) means the upstream's own (the address we connected to)."""
    host, port = bound
    if host in ("0.0.0.0", "::"):
        host = upstream_peer[0]
    return host, port
