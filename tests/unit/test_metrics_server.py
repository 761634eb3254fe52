"""The metrics endpoint's HTTP handling: the request parser on synthetic bytes, and the server
on a loopback socket driven by a test loop with a fake clock (no root, no thread)."""

from __future__ import annotations

import selectors
import socket

import pytest

from tproxyd.reconciler import metrics_server as ms
from tproxyd.reconciler.metrics_server import MetricsServer, Request, parse_request


@pytest.mark.parametrize("head, expected", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Request("GET", "")),
    (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Request("GET", "")),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", Request("HEAD", "")),
    (b"GET /metrics HTTP/1.1\nACCEPT: application/openmetrics-text\n\n",
     Request("GET", "application/openmetrics-text")),
    (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"GET http://x/metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n : empty name\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
])
def test_parse_request(head, expected):
    assert parse_request(head) == expected


class Loop:
    """The daemon's loop in miniature: select, call the handler, tick."""

    def __init__(self, fresh: bool = True):
        self.now = 1000.0
        self.selector = selectors.DefaultSelector()
        self.refreshes = 0
        self.is_fresh = fresh
        self.accepts: list[str] = []
        self.server = MetricsServer("127.0.0.1", 0, self.selector, lambda: self.now, self.render,
                                    self.refresh, lambda: self.is_fresh)
        self.server.open()

    def render(self, accept: str) -> tuple[bytes, str]:
        self.accepts.append(accept)
        return b"tproxyd_up 1\n", "text/plain; version=0.0.4"

    def refresh(self) -> None:
        self.refreshes += 1

    def turn(self) -> None:
        for key, _ in self.selector.select(0.01):
            key.data()
        self.server.tick()

    def connect(self) -> socket.socket:
        c = socket.create_connection(self.server.address)
        c.setblocking(False)
        self.turn()
        return c

    def answer(self, c: socket.socket, turns: int = 200) -> bytes:
        """Everything the server sends until it closes."""
        data = b""
        for _ in range(turns):
            self.turn()
            try:
                chunk = c.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        else:
            raise AssertionError(f"not closed after {turns} turns; got {data!r}")
        c.close()
        return data

    def close(self) -> None:
        self.server.close()
        self.selector.close()


@pytest.fixture
def loop():
    the_loop = Loop()
    yield the_loop
    the_loop.close()


def test_a_scrape_gets_the_rendered_metrics_and_the_connection_closes(loop):
    c = loop.connect()
    c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain;version=0.0.4\r\n\r\n")
    out = loop.answer(c)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert b"Content-Length: 13" in head and b"Connection: close" in head
    assert body == b"tproxyd_up 1\n"
    assert loop.accepts == ["text/plain;version=0.0.4"] and loop.refreshes == 1
    assert loop.server.clients == []


def test_head_gets_headers_only(loop):
    c = loop.connect()
    c.send(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    out = loop.answer(c)
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"\r\n\r\n")
    assert b"Content-Length: 13" in out


def test_a_request_in_pieces(loop):
    c = loop.connect()
    for piece in (b"GET /met", b"rics HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
        c.send(piece)
        loop.turn()
    assert loop.answer(c).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("request_bytes, status", [
    (b"hello there\r\n\r\n", b"400"),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
])
def test_a_bad_request_gets_its_status_and_a_close(loop, request_bytes, status):
    c = loop.connect()
    c.send(request_bytes)
    out = loop.answer(c)
    assert out.startswith(b"HTTP/1.1 " + status)
    assert loop.accepts == [] and loop.refreshes == 0


def test_an_endless_header_is_cut_at_max_request(loop):
    c = loop.connect()
    c.send(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * ms.MAX_REQUEST)
    assert loop.answer(c).startswith(b"HTTP/1.1 431")
    assert loop.accepts == []


def test_a_silent_client_is_timed_out(loop):
    c = loop.connect()
    c.send(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
    loop.turn()
    assert loop.server.tick() == pytest.approx(loop.now + ms.READ_TIMEOUT)
    loop.now += ms.READ_TIMEOUT
    assert loop.answer(c).startswith(b"HTTP/1.1 408")
    assert loop.server.clients == []


def test_a_client_gone_before_its_request_is_forgotten(loop):
    c = loop.connect()
    c.close()
    for _ in range(5):
        loop.turn()
    assert loop.server.clients == []


def test_a_scrape_waits_for_fresh_counters_at_most_fresh_wait():
    loop = Loop(fresh=False)
    try:
        c = loop.connect()
        c.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        for _ in range(5):
            loop.turn()
        assert loop.refreshes == 1 and loop.accepts == []  # the workers have not answered
        loop.now += ms.FRESH_WAIT
        assert loop.answer(c).startswith(b"HTTP/1.1 200")
        c = loop.connect()
        c.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        loop.turn()
        loop.is_fresh = True  # they answered: no need to wait out FRESH_WAIT
        assert loop.answer(c).startswith(b"HTTP/1.1 200")
    finally:
        loop.close()


def test_clients_past_max_clients_are_closed_at_once(loop):
    held = [loop.connect() for _ in range(ms.MAX_CLIENTS)]
    extra = loop.connect()
    assert len(loop.server.clients) == ms.MAX_CLIENTS
    assert loop.answer(extra, turns=20) == b""
    for c in held:
        c.close()


def test_a_v6_listener_is_v6_only():
    selector = selectors.DefaultSelector()
    server = MetricsServer("::1", 0, selector, lambda: 0.0, lambda a: (b"", ""), lambda: None,
                           lambda: True)
    try:
        server.open()
    except OSError as exc:  # no IPv6 on this host
        pytest.skip(f"no ::1: {exc}")
    try:
        assert server.listener is not None
        assert server.listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        server.close()
        selector.close()


def test_a_taken_address_raises_and_leaves_nothing_registered():
    selector = selectors.DefaultSelector()
    taken = socket.create_server(("127.0.0.1", 0))
    server = MetricsServer("127.0.0.1", taken.getsockname()[1], selector, lambda: 0.0,
                           lambda a: (b"", ""), lambda: None, lambda: True)
    try:
        with pytest.raises(OSError):
            server.open()
        assert server.listener is None and not selector.get_map()
    finally:
        taken.close()
        selector.close()


def test_a_failing_render_fails_that_scrape_not_the_loop(loop, caplog):
    def broken(accept: str) -> tuple[bytes, str]:
        raise KeyError("a bug")

    loop.server.render = broken
    c = loop.connect()
    c.send(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert loop.answer(c).startswith(b"HTTP/1.1 500")
    assert "rendering failed" in caplog.text
    loop.server.render = loop.render
    c = loop.connect()
    c.send(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert loop.answer(c).startswith(b"HTTP/1.1 200")
