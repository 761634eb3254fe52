"""The daemon's Prometheus endpoint ([metrics] listen): GET /metrics over HTTP/1.x, served from
the daemon's own selectors loop.

No thread: the listener and each scraper's socket sit in the daemon's selector like the status
socket does, so a scrape reads the loop's state without a lock and a slow or hostile client
holds nothing up. A request is read up to MAX_REQUEST bytes within READ_TIMEOUT; anything that
is not a well-formed GET or HEAD gets an error status and the connection is closed (one
request per connection: every answer says Connection: close). Like `tproxy status`, a scrape
asks the workers for fresh counters and is answered when they have all replied or after
FRESH_WAIT.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

log = logging.getLogger("tproxyd")

MAX_REQUEST = 8192  # bytes of request line and headers; a scraper sends a few hundred
READ_TIMEOUT = 5.0  # seconds to send a whole request
SEND_TIMEOUT = 5.0  # seconds to take the whole answer
FRESH_WAIT = 0.25  # seconds a scrape waits for the workers' fresh counters at most
MAX_CLIENTS = 16  # connections at once; past it, new ones are closed at once
PATH = "/metrics"

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large",
           500: "Internal Server Error"}

# (body, content type) for an Accept header
Render = Callable[[str], Tuple[bytes, str]]


@dataclass(frozen=True)
class Request:
    method: str  # GET or HEAD
    accept: str  # the Accept header, "" if none


def parse_request(head: bytes) -> Union[Request, int]:
    """A request's line and headers (up to the blank line) -> a Request for /metrics, or the
    error status to answer with. Pure: tested with synthetic bytes."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return 400
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return 400
    method, target, _ = parts
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or not name.isprintable():
            return 400
        headers[name.lower()] = value.strip()
    if not target.startswith("/"):
        return 400
    if method not in ("GET", "HEAD"):
        return 405
    if target.split("?", 1)[0] != PATH:
        return 404
    return Request(method, headers.get("accept", ""))


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def error(status: int) -> bytes:
    return response(status, f"{status} {REASONS[status]}\n".encode())


@dataclass
class _Client:
    sock: socket.socket
    since: float  # when it connected; when its answer started, once sending
    buf: bytes = b""
    request: Request | None = None  # complete, waiting for fresh counters
    out: bytes = b""
    sending: bool = False


class MetricsServer:
    def __init__(self, host: str, port: int, selector: selectors.BaseSelector,
                 clock: Callable[[], float], render: Render, refresh: Callable[[], None],
                 fresh: Callable[[], bool]):
        """render builds the answer for an Accept header; refresh asks the workers for new
        counters; fresh says whether they have all answered since."""
        self.host, self.port = host, port
        self.selector = selector
        self.clock = clock
        self.render, self.refresh, self.fresh = render, refresh, fresh
        self.listener: socket.socket | None = None
        self.clients: List[_Client] = []

    @property
    def address(self) -> Tuple[str, int]:
        """Where it listens (the port the kernel chose, for port 0)."""
        assert self.listener is not None
        return self.listener.getsockname()[:2]

    def open(self) -> None:
        """Bind and listen; OSError (address taken or not local) leaves nothing open."""
        v6 = ":" in self.host
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart in TIME_WAIT
            if v6:  # [::]:port means IPv6 only: the endpoint is where the config says, no more
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.host, self.port))
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, self._accept)
        except BaseException:
            sock.close()
            raise
        self.listener = sock

    def close(self) -> None:
        for c in list(self.clients):
            self._drop(c)
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def tick(self) -> float | None:
        """Answer the scrapes whose wait is over; drop clients past their deadlines. The next
        deadline, if any."""
        now = self.clock()
        waiting = [c for c in self.clients if c.request is not None and not c.sending]
        if waiting and (self.fresh() or min(c.since for c in waiting) + FRESH_WAIT <= now):
            for c in waiting:
                assert c.request is not None
                try:
                    body, content_type = self.render(c.request.accept)
                except Exception:  # our bug: that scrape fails, never the daemon's loop
                    log.exception("metrics: rendering failed")
                    self._send(c, error(500), now)
                    continue
                self._send(c, response(200, body, content_type, c.request.method == "HEAD"), now)
        for c in list(self.clients):
            if c.sending and now - c.since >= SEND_TIMEOUT:
                self._drop(c)
            elif c.request is None and not c.sending and now - c.since >= READ_TIMEOUT:
                self._send(c, error(408), now)
        deadlines = [c.since + (FRESH_WAIT if c.request and not c.sending else
                                SEND_TIMEOUT if c.sending else READ_TIMEOUT) for c in self.clients]
        return min(deadlines, default=None)

    # --- internals -----------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # BlockingIOError: none left; others (EMFILE): the next turn tries
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock, self.clock())
            self.clients.append(c)
            self.selector.register(sock, selectors.EVENT_READ, lambda c=c: self._on_readable(c))

    def _on_readable(self, c: _Client) -> None:
        try:
            chunk = c.sock.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        if not chunk:  # gone before a whole request
            self._drop(c)
            return
        c.buf += chunk
        end = min((i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := c.buf.find(sep)) >= 0),
                  default=-1)
        if end < 0:
            if len(c.buf) > MAX_REQUEST:
                self._send(c, error(431), self.clock())
            return
        if end > MAX_REQUEST:
            self._send(c, error(431), self.clock())
            return
        parsed = parse_request(c.buf[:end])
        if isinstance(parsed, int):
            self._send(c, error(parsed), self.clock())
            return
        # complete: read nothing more; it is answered by tick() once the counters are fresh
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(c.sock)
        c.request, c.since, c.buf = parsed, self.clock(), b""
        self.refresh()

    def _send(self, c: _Client, data: bytes, now: float) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(c.sock)
        c.out, c.sending, c.since = data, True, now
        self._write(c)

    def _write(self, c: _Client) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            self._drop(c)
            return
        try:
            self.selector.get_key(c.sock)
        except KeyError:  # the rest goes when the client has taken some
            self.selector.register(c.sock, selectors.EVENT_WRITE, lambda: self._write(c))

    def _drop(self, c: _Client) -> None:
        if c in self.clients:
            self.clients.remove(c)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(c.sock)
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)  # the answer is sent before the close
        c.sock.close()
