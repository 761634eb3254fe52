"""Routes by name in the relay's loop (issue 13), on loopback without root: the SNIFFING state
reads the client's first bytes, routes on the name, and sends those bytes on unchanged. Fake
upstreams record what they were asked for; the same behaviours run with curl, openssl and real
proxies in tests/kernel/test_domains.py."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.unit.test_relay_loop import (
    DEADLINE,
    Upstream,
    closed_port,
    echo,
    running,
    wait_for,
)
from tests.unit.test_relay_routes import recv_exactly, stats, upstream_at
from tproxyd.relay.connection import State
from tproxyd.relay.ends import End
from tproxyd.state.upstreams import HTTP, SOCKS5, RouteRule
from tproxyd.state.upstreams import Upstream as UpstreamConfig

DATA = Path(__file__).resolve().parent.parent / "data" / "tls"
HELLO = (DATA / "curl-tls13.bin").read_bytes()  # SNI www.example.com
BIG_HELLO = (DATA / "openssl-ffdhe8192-records.bin").read_bytes()  # big.example.net, 4 records
PLAIN = (DATA / "curl-http11.http").read_bytes()  # Host: plain.example.com:8443


class NamedSocks5:
    """A SOCKS5 server (no auth) that records each CONNECT's target as (ATYP, host, port) and
    then echoes: what the relay sent first comes back first."""

    def __init__(self) -> None:
        self.targets: list[tuple[int, str, int]] = []
        self.server = Upstream(self.handle)

    def handle(self, conn: socket.socket) -> None:
        head = recv_exactly(conn, 2)
        recv_exactly(conn, head[1])
        conn.sendall(b"\x05\x00")
        _, _, _, atyp = recv_exactly(conn, 4)
        if atyp == 3:
            host = recv_exactly(conn, recv_exactly(conn, 1)[0]).decode()
        else:
            host = socket.inet_ntop(socket.AF_INET if atyp == 1 else socket.AF_INET6,
                                    recv_exactly(conn, 4 if atyp == 1 else 16))
        (port,) = struct.unpack("!H", recv_exactly(conn, 2))
        self.targets.append((atyp, host, port))
        conn.sendall(b"\x05\x00\x00\x01" + bytes(6))
        echo(conn)

    def config(self, name: str, **kw) -> UpstreamConfig:
        return UpstreamConfig(name, SOCKS5, "127.0.0.1", self.server.addr[1], check_interval=0, **kw)


def exchange(addr: tuple, pieces: list[bytes], expect: int, pause: float = 0.0) -> bytes:
    """Send pieces (one write each, no coalescing), read back `expect` bytes."""
    with socket.create_connection(addr, timeout=DEADLINE) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            c.sendall(piece)
            if pause:
                time.sleep(pause)
        return recv_exactly(c, expect)


def named(name: str, via: tuple, *domains: str, **keys) -> RouteRule:
    return RouteRule(name, via, domains=domains, **keys)


def test_a_tls_name_routes_through_the_upstream_which_gets_the_name_and_the_hello_unchanged(
        tmp_path):
    proxy = NamedSocks5()
    direct = Upstream(echo)
    log = tmp_path / "access.log"
    routes = (named("corp", ("p",), "example.com"),)
    with running(direct.addr, upstreams=(proxy.config("p"),), routes=routes,
                 access_log=str(log)) as (relay, addr):
        assert exchange(addr, [HELLO], len(HELLO)) == HELLO  # echoed by the proxy, unchanged
        wait_for(lambda: relay.counters.active == 0, "the connection to end")
        s = stats(relay)
    assert proxy.targets == [(3, "www.example.com", direct.addr[1])]  # ATYP 3: DOMAINNAME
    assert s["route_corp_connections"] == 1 and s["upstream_p_connections"] == 1
    assert s["upstream_p_sent"] == len(HELLO)
    line = json.loads(log.read_text())
    assert (line["domain"], line["route"], line["via"], line["end"]) == (
        "www.example.com", "corp", "p", "client_fin")


class SlowSocks5(NamedSocks5):
    """Answers the greeting only after a pause: what the client sends meanwhile arrives while
    the relay is still in the upstream's handshake."""

    def handle(self, conn: socket.socket) -> None:
        time.sleep(0.3)
        super().handle(conn)


def test_bytes_sent_during_the_handshake_follow_the_sniffed_ones_through_the_tunnel():
    proxy = SlowSocks5()
    routes = (named("corp", ("p",), "example.com"),)
    with running(("127.0.0.1", 9), upstreams=(proxy.config("p"),), routes=routes) as (_, addr):
        # the hello is sniffed and routed; "more" comes while the upstream has not answered
        got = exchange(addr, [HELLO, b"more"], len(HELLO) + 4, pause=0.1)
    assert got == HELLO + b"more"


def test_without_send_domain_the_upstream_gets_the_address():
    proxy = NamedSocks5()
    routes = (named("corp", ("p",), "example.com"),)
    with running(("127.0.0.1", 9), upstreams=(proxy.config("p", send_domain=False),),
                 routes=routes) as (_, addr):
        assert exchange(addr, [HELLO], len(HELLO)) == HELLO
    assert proxy.targets == [(1, "127.0.0.1", 9)]


def test_another_name_goes_direct_with_its_bytes_unchanged():
    proxy = NamedSocks5()
    direct = Upstream(echo)
    routes = (named("corp", ("p",), "=example.com"),)  # exact: www.example.com is not it
    with running(direct.addr, upstreams=(proxy.config("p"),), routes=routes) as (relay, addr):
        assert exchange(addr, [BIG_HELLO], len(BIG_HELLO)) == BIG_HELLO
        assert exchange(addr, [HELLO], len(HELLO)) == HELLO
        assert stats(relay)["route_corp_connections"] == 0
    assert proxy.targets == []


def test_a_rejected_name_is_reset_counted_and_logged(tmp_path):
    direct = Upstream(echo)
    log = tmp_path / "access.log"
    routes = (named("ads", ("reject",), "www.example.com"),)
    with running(direct.addr, routes=routes, access_log=str(log)) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(HELLO)
            with pytest.raises(ConnectionResetError):
                c.recv(1)
        wait_for(lambda: relay.counters.tcp_ends[End.REJECTED] == 1, "the reject")
        assert stats(relay)["route_ads_connections"] == 1
        assert exchange(addr, [PLAIN], len(PLAIN)) == PLAIN  # plain.example.com: direct
    first = json.loads(log.read_text().splitlines()[0])
    assert (first["domain"], first["route"], first["via"], first["end"]) == (
        "www.example.com", "ads", "reject", "rejected")


def test_http_host_routes_and_an_http_upstream_gets_connect_name_port():
    seen = []

    def http_proxy(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        seen.append(head.split(b"\r\n")[:2])
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        echo(conn)

    proxy = Upstream(http_proxy)
    routes = (named("web", ("h",), "example.com"),)
    with running(("198.18.2.2", 8443), upstreams=(upstream_at("h", proxy.addr, kind=HTTP),),
                 routes=routes) as (_, addr):
        assert exchange(addr, [PLAIN], len(PLAIN)) == PLAIN
    assert seen == [[b"CONNECT plain.example.com:8443 HTTP/1.1", b"Host: plain.example.com:8443"]]


def test_a_hello_in_50_byte_writes_is_still_routed_by_name():
    proxy = NamedSocks5()
    routes = (named("corp", ("p",), "big.example.net"),)
    pieces = [BIG_HELLO[i:i + 50] for i in range(0, len(BIG_HELLO), 50)]
    with running(("127.0.0.1", 9), upstreams=(proxy.config("p"),), routes=routes) as (_, addr):
        assert exchange(addr, pieces, len(BIG_HELLO), pause=0.002) == BIG_HELLO
    assert proxy.targets == [(3, "big.example.net", 9)]


def banner(conn: socket.socket) -> None:
    conn.sendall(b"220 server speaks first\r\n")
    echo(conn)


def first_line_after(addr: tuple) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(addr, timeout=DEADLINE) as c:
        got = c.recv(100)
        return got, time.monotonic() - started


def test_a_server_first_protocol_waits_at_most_the_sniff_timeout():
    server = Upstream(banner)
    routes = (named("corp", ("reject",), "example.com"),)
    with running(server.addr, routes=routes, sniff_timeout=0.3) as (relay, addr):
        got, took = first_line_after(addr)
        assert got == b"220 server speaks first\r\n"
        assert 0.25 <= took < 3.0  # the sniff's wait, then direct: no name, no domains route
        assert stats(relay)["route_corp_connections"] == 0


def test_no_wait_where_no_domains_route_could_match():
    server = Upstream(banner)
    routes = (named("corp", ("reject",), "example.com", ports=((443, 443),)),)
    with running(server.addr, routes=routes, sniff_timeout=5) as (_, addr):
        got, took = first_line_after(addr)  # the server's port is not 443: routed at accept
        assert got == b"220 server speaks first\r\n" and took < 2.5


def test_a_route_before_the_domains_route_that_matches_anyway_means_no_wait():
    server = Upstream(banner)
    routes = (RouteRule("all", ("direct",)), named("corp", ("reject",), "example.com"))
    with running(server.addr, routes=routes, sniff_timeout=5) as (relay, addr):
        got, took = first_line_after(addr)
        assert got == b"220 server speaks first\r\n" and took < 2.5
        assert stats(relay)["route_all_connections"] == 1


def test_a_client_reset_while_sniffing_ends_as_client_reset():
    server = Upstream(echo)
    routes = (named("corp", ("reject",), "example.com"),)
    with running(server.addr, routes=routes, sniff_timeout=5) as (relay, addr):
        c = socket.create_connection(addr, timeout=DEADLINE)
        c.sendall(HELLO[:100])
        wait_for(lambda: any(x.state is State.SNIFFING for x in list(relay.connections)),
                 "the connection to wait for its name")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        wait_for(lambda: relay.counters.tcp_ends[End.CLIENT_RESET] == 1, "the client reset")
        assert relay.counters.active == 0 and not relay.per_client


def test_a_client_that_sends_and_closes_while_sniffing_is_routed_and_its_fin_passed_on():
    got = []

    def record(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        got.append(data)
        conn.sendall(b"bye")

    server = Upstream(record)
    routes = (named("corp", ("reject",), "example.com"),)
    with running(server.addr, routes=routes, sniff_timeout=5) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(HELLO[:100])  # half a ClientHello, then FIN: no name
            c.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b"bye"
        wait_for(lambda: relay.counters.active == 0, "the connection to end")
        assert relay.counters.tcp_ends[End.CLIENT_FIN] == 1
    assert got == [HELLO[:100]]


def test_a_client_that_closes_without_a_byte_is_routed_without_a_name_and_ends_by_fin():
    server = Upstream(echo)
    routes = (named("corp", ("reject",), "example.com"),)
    with running(server.addr, routes=routes, sniff_timeout=5) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b""  # the server saw the FIN and closed: no reset, no wait
        wait_for(lambda: relay.counters.active == 0, "the connection to end")
        assert relay.counters.tcp_ends[End.CLIENT_FIN] == 1
        assert stats(relay)["route_corp_connections"] == 0


def test_the_sniffed_name_shows_in_the_connection_list():
    proxy = NamedSocks5()
    routes = (named("corp", ("p",), "example.com"),)
    with running(("127.0.0.1", 9), upstreams=(proxy.config("p"),), routes=routes) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(HELLO)
            recv_exactly(c, len(HELLO))
            rows = relay.connection_list()["connections"]
        assert [(r["domain"], r["route"], r["via"]) for r in rows] == [
            ("www.example.com", "corp", "p")]


def test_a_declined_connect_is_reported_with_the_name(tmp_path, caplog):
    def refusing(conn: socket.socket) -> None:
        recv_exactly(conn, 3)
        conn.sendall(b"\x05\x00")
        conn.recv(512)
        conn.sendall(b"\x05\x04\x00\x01" + bytes(6))  # host unreachable

    proxy = Upstream(refusing)
    log = tmp_path / "access.log"
    routes = (named("corp", ("p",), "example.com"),)
    with running(("127.0.0.1", 9), upstreams=(upstream_at("p", proxy.addr),), routes=routes,
                 access_log=str(log)) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(HELLO)
            with pytest.raises(ConnectionResetError):
                c.recv(1)
        wait_for(lambda: relay.counters.tcp_ends[End.UPSTREAM_ERROR] == 1, "the failure")
    line = json.loads(log.read_text())
    assert line["domain"] == "www.example.com" and line["end"] == "upstream_error"
    assert "www.example.com:9" in line["error"]


def test_an_upstream_that_is_down_fails_over_with_the_sniffed_bytes_kept():
    proxy = NamedSocks5()
    dead = upstream_at("dead", closed_port())
    routes = (named("corp", ("dead", "p"), "example.com"),)
    with running(("127.0.0.1", 9), upstreams=(dead, proxy.config("p")), routes=routes) as (_, addr):
        assert exchange(addr, [HELLO], len(HELLO)) == HELLO
    assert proxy.targets == [(3, "www.example.com", 9)]


# --- UDP (QUIC): DatagramSniffer with a stand-in for the relay (UDP needs TPROXY: the real path
# is in tests/kernel/test_domains.py) -------------------------------------------------------------


class HeldFor:
    """What DatagramSniffer needs of the relay: routes, the clock, timers, open_sniffed."""

    def __init__(self, routes: tuple) -> None:
        from tproxyd.relay.loop import Settings
        from tproxyd.state.routes import RouteTable

        self.routes = RouteTable(routes)
        self.settings = Settings(sniff_timeout=0.3)
        self.now = 100.0
        self.timers: list = []
        self.opened: list = []
        self.udp = self
        self.upstream_ips: set = set()

    def at(self, when, fn, arg) -> None:
        self.timers.append((when, fn, arg))

    def open_sniffed(self, client, dst, sniff) -> None:
        self.opened.append((client, dst, sniff.name, list(sniff.datagrams)))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for when, fn, arg in timers:
            self.now = when
            fn(arg, when)


def two_initials(name: bytes) -> tuple[bytes, bytes]:
    from tests.unit.tlsgen import client_hello, crypto_frame, initial, post_quantum, sni

    hello = client_hello([post_quantum(), sni(name)])
    return (initial(b"\x88" * 8, 0, crypto_frame(0, hello[:1100]), pad_to=1200),
            initial(b"\x88" * 8, 1, crypto_frame(1100, hello[1100:]), pad_to=1200))


QUIC_ROUTES = (named("ads", ("reject",), "example.com", ports=((443, 443),)),)
CLIENT, SERVER = ("198.18.1.2", 5000), ("198.18.2.2", 443)


def test_a_quic_hello_over_two_datagrams_is_held_until_the_name_then_sent_in_order():
    from tproxyd.relay.sniffing import DatagramSniffer

    relay = HeldFor(QUIC_ROUTES)
    sniffer = DatagramSniffer(relay)
    a, b = two_initials(b"late.example.com")
    assert sniffer.hold(CLIENT, SERVER, a) and relay.opened == []  # the name is in b
    assert sniffer.held() == 1  # the stats' udp_held
    assert sniffer.hold(CLIENT, SERVER, b)
    assert relay.opened == [(CLIENT, SERVER, "late.example.com", [a, b])]
    assert sniffer.pending == {} and sniffer.held() == 0
    relay.fire()  # the deadline of a settled sniff does nothing
    assert len(relay.opened) == 1


def test_udp_that_is_not_quic_opens_at_once_and_other_ports_are_not_held():
    from tproxyd.relay.sniffing import DatagramSniffer

    relay = HeldFor(QUIC_ROUTES)
    sniffer = DatagramSniffer(relay)
    assert sniffer.hold(CLIENT, SERVER, b"\x12\x34 a DNS query, say")
    assert relay.opened == [(CLIENT, SERVER, None, [b"\x12\x34 a DNS query, say"])]
    assert not sniffer.hold(CLIENT, ("198.18.2.2", 53), b"x")  # no domains route there
    assert not DatagramSniffer(HeldFor((RouteRule("all", ("direct",)),))).hold(CLIENT, SERVER, b"x")


def test_a_quic_hello_cut_short_opens_without_a_name_at_the_sniff_timeout():
    from tproxyd.relay.sniffing import DatagramSniffer

    relay = HeldFor(QUIC_ROUTES)
    sniffer = DatagramSniffer(relay)
    a, _ = two_initials(b"late.example.com")
    assert sniffer.hold(CLIENT, SERVER, a)
    relay.fire()
    assert relay.opened == [(CLIENT, SERVER, None, [a])] and relay.now == 100.3


def test_datagrams_still_held_when_the_relay_closes_are_dropped_and_counted():
    from tproxyd.relay.sniffing import DatagramSniffer

    relay = HeldFor(QUIC_ROUTES)
    sniffer = DatagramSniffer(relay)
    a, _ = two_initials(b"late.example.com")
    assert sniffer.hold(CLIENT, SERVER, a) and sniffer.hold(("198.18.1.3", 5000), SERVER, a)
    assert sniffer.held() == 2
    assert sniffer.drop_all() == 2 and sniffer.pending == {} and sniffer.held() == 0
    relay.fire()  # their deadlines open nothing
    assert relay.opened == []
