"""Routes and upstream proxies in the relay's loop, on loopback without root: fake SOCKS5 and
HTTP CONNECT upstreams in threads, the original destination given by a function. The same
behaviours run against real proxies (microsocks, dante, tinyproxy) in tests/kernel/test_routes.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from tests.unit.test_relay_loop import (
    DEADLINE,
    Upstream,
    closed_port,
    digest_until_eof,
    echo,
    expect_reset,
    recv_all,
    reset,
    running,
    wait_for,
)
from tproxyd.relay.connection import EARLY_LIMIT
from tproxyd.relay.ends import End
from tproxyd.relay.loop import Relay
from tproxyd.state.upstreams import HTTP, SOCKS5, RouteRule
from tproxyd.state.upstreams import Upstream as UpstreamConfig

DST = ("127.0.0.1", 9)  # the "original destination" every accepted connection reports


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


class FakeSocks5:
    """A SOCKS5 server (no auth, CONNECT to IPv4) that records each request's target, replies
    success with `early` right behind the reply in the same segment, then echoes."""

    def __init__(self, early: bytes = b""):
        self.targets: list[tuple[str, int]] = []
        self.early = early
        self.server = Upstream(self.handle)

    def handle(self, conn: socket.socket) -> None:
        head = recv_exactly(conn, 2)
        recv_exactly(conn, head[1])
        conn.sendall(b"\x05\x00")
        ver, cmd, _, atyp = recv_exactly(conn, 4)
        assert (ver, cmd, atyp) == (5, 1, 1)
        host = socket.inet_ntoa(recv_exactly(conn, 4))
        (port,) = struct.unpack("!H", recv_exactly(conn, 2))
        self.targets.append((host, port))
        conn.sendall(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00" + self.early)
        echo(conn)

    def config(self, name: str, **kw) -> UpstreamConfig:
        return UpstreamConfig(name, SOCKS5, "127.0.0.1", self.server.addr[1], check_interval=0, **kw)


def upstream_at(name: str, addr: tuple, kind: str = SOCKS5, **kw) -> UpstreamConfig:
    kw.setdefault("check_interval", 0)
    return UpstreamConfig(name, kind, addr[0], addr[1], **kw)


def roundtrip(addr: tuple, message: bytes, expect: bytes) -> None:
    with socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(message)
        assert recv_exactly(c, len(expect)) == expect


def stats(relay: Relay) -> dict:
    """The relay's stats from the test's thread: its loop may change the set of connections
    while they are summed (the stats socket, in the loop's thread, never races)."""
    for _ in range(100):
        try:
            return relay.stats()
        except RuntimeError:
            continue
    raise AssertionError("the connections never held still")


def test_a_route_via_an_upstream_carries_the_connection_and_its_early_bytes_come_first():
    proxy = FakeSocks5(early=b"banner ")
    routes = (RouteRule("corp", ("a",)),)
    with running(DST, upstreams=(proxy.config("a"),), routes=routes) as (relay, addr):
        roundtrip(addr, b"ping", b"banner ping")
        wait_for(lambda: relay.counters.active == 0, "the connection to end")
        s = stats(relay)
        assert proxy.targets == [DST]  # the upstream was asked for the original destination
        assert s["route_corp_connections"] == 1 and s["upstream_a_connections"] == 1
        assert s["upstream_a_up"] == 1 and s["upstream_a_active"] == 0
        assert s["upstream_a_sent"] == 4 and s["upstream_a_received"] == 11
        assert s["end_tcp_client_fin"] == 1
    assert not proxy.server.errors


def test_no_matching_route_goes_direct():
    direct = Upstream(echo)
    proxy = FakeSocks5()
    routes = (RouteRule("other", ("a",), ports=((1, 2),)),)
    with running(direct.addr, upstreams=(proxy.config("a"),), routes=routes) as (relay, addr):
        roundtrip(addr, b"hello", b"hello")
        assert proxy.targets == []
        assert stats(relay)["route_other_connections"] == 0


def test_a_reject_route_resets_at_once_and_is_counted():
    with running(DST, routes=(RouteRule("ads", ("reject",)),)) as (relay, addr):
        expect_reset(addr)
        wait_for(lambda: relay.counters.tcp_ends[End.REJECTED] == 1, "the reject count")
        assert stats(relay)["route_ads_connections"] == 1


def test_failover_to_the_second_upstream_when_the_first_refuses():
    proxy = FakeSocks5()
    dead = upstream_at("dead", closed_port())
    routes = (RouteRule("corp", ("dead", "b")),)
    with running(DST, upstreams=(dead, proxy.config("b")), routes=routes) as (relay, addr):
        roundtrip(addr, b"one", b"one")
        roundtrip(addr, b"two", b"two")  # dead is skipped now (down, in backoff)
        s = stats(relay)
        assert s["upstream_dead_failures"] == 1 and s["upstream_dead_up"] == 0
        assert s["upstream_b_connections"] == 2
        assert relay.health["dead"].failure_counts == {"refused": 1}


def test_every_upstream_dead_resets_the_client_as_upstream_error():
    routes = (RouteRule("corp", ("a", "b")),)
    ups = (upstream_at("a", closed_port()), upstream_at("b", closed_port()))
    with running(DST, upstreams=ups, routes=routes) as (relay, addr):
        expect_reset(addr)
        wait_for(lambda: relay.counters.tcp_ends[End.UPSTREAM_ERROR] == 1, "the count")
        expect_reset(addr)  # both down now: reset at accept, no attempt
        wait_for(lambda: relay.counters.tcp_ends[End.UPSTREAM_ERROR] == 2, "the count")
        s = stats(relay)
        assert s["upstream_a_failures"] == s["upstream_b_failures"] == 1
        assert relay.counters.active == 0


def test_ends_and_bytes_are_counted_by_route_and_via():
    """The metrics' labels: each end under its (proto, route, via), bytes under their via; a
    connection still open counts its bytes already."""
    proxy, direct = FakeSocks5(early=b"banner "), Upstream(echo)
    routes = (RouteRule("corp", ("a",), ports=((9, 9),)), RouteRule("ads", ("reject",),
                                                                      ports=((10, 10),)))
    dst = {"port": 9}

    def original_dst(_: socket.socket) -> tuple:
        return DST if dst["port"] == 9 else ("127.0.0.1", dst["port"])

    with running(DST, upstreams=(proxy.config("a"),), routes=routes) as (relay, addr):
        relay.original_dst = original_dst
        with socket.create_connection(addr, timeout=DEADLINE) as c:  # corp via a, open
            c.sendall(b"ping")
            assert recv_exactly(c, 11) == b"banner ping"
            wait_for(lambda: stats(relay).get("bytes|down|a") == 11, "the open bytes via a")
            s = stats(relay)
            assert s["bytes|up|a"] == 4 and s["upstream_a_sent"] == 4
            assert s["upstream_a_received"] == 11
        dst["port"] = 10
        expect_reset(addr)  # ads: reject
        dst["port"] = direct.addr[1]
        with socket.create_connection(addr, timeout=DEADLINE) as c:  # no route: direct, open
            c.sendall(b"12345")
            assert recv_exactly(c, 5) == b"12345"
            # counted by the relay's thread just after the bytes went: wait for it
            wait_for(lambda: stats(relay).get("bytes|down|direct") == 5, "the open bytes")
            assert stats(relay)["bytes|up|direct"] == 5
        wait_for(lambda: relay.counters.active == 0, "the connections to end")
        s = stats(relay)
    paths = {k: v for k, v in s.items() if k.startswith("connections|")}
    assert paths == {"connections|tcp|corp|a|client_fin": 1,
                     "connections|tcp|ads|reject|rejected": 1,
                     "connections|tcp|direct|direct|client_fin": 1}
    assert (s["bytes|up|a"], s["bytes|down|a"]) == (4, 11)
    assert (s["bytes|up|direct"], s["bytes|down|direct"]) == (5, 5)
    assert "bytes|up|reject" not in s  # a connection reset at accept moved nothing
    # the flat counters the rest reads are unchanged
    assert s["end_tcp_client_fin"] == 2 and s["end_tcp_rejected"] == 1
    assert s["bytes_up"] == 9 and s["upstream_a_sent"] == 4


def test_a_connection_no_upstream_could_carry_counts_under_the_last_it_tried():
    routes = (RouteRule("corp", ("a", "b")),)
    ups = (upstream_at("a", closed_port()), upstream_at("b", closed_port()))
    with running(DST, upstreams=ups, routes=routes) as (relay, addr):
        expect_reset(addr)  # a refused, then b refused
        wait_for(lambda: relay.counters.tcp_ends[End.UPSTREAM_ERROR] == 1, "the count")
        expect_reset(addr)  # both down: reset at accept, under the route's first choice
        wait_for(lambda: relay.counters.tcp_ends[End.UPSTREAM_ERROR] == 2, "the count")
        s = stats(relay)
    assert s["connections|tcp|corp|b|upstream_error"] == 1
    assert s["connections|tcp|corp|a|upstream_error"] == 1


def hostile(behaviour: str):
    def handle(conn: socket.socket) -> None:
        conn.recv(16)
        if behaviour == "endless header":  # an HTTP proxy whose response header never ends
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (20 << 10))
            conn.recv(16)
        elif behaviour == "garbage":
            conn.sendall(b"HTTP/1.0 400 nonsense\r\n\r\n")
        elif behaviour == "close":
            conn.sendall(b"\x05")  # half a method choice, then gone
        elif behaviour == "silent":
            conn.recv(16)  # holds the connection open, never answers
    return Upstream(handle)


def test_hostile_upstreams_cost_one_attempt_each_and_the_relay_lives_on():
    garbage, closer, silent = hostile("garbage"), hostile("close"), hostile("silent")
    good = FakeSocks5()
    ups = (upstream_at("garbage", garbage.addr), upstream_at("closer", closer.addr),
           upstream_at("silent", silent.addr, connect_timeout=0.5), good.config("good"))
    routes = (RouteRule("corp", ("garbage", "closer", "silent", "good")),)
    with running(DST, upstreams=ups, routes=routes) as (relay, addr):
        roundtrip(addr, b"still works", b"still works")
        s = stats(relay)
        for name in ("garbage", "closer", "silent"):
            assert s[f"upstream_{name}_failures"] == 1 and s[f"upstream_{name}_up"] == 0, name
        assert relay.health["garbage"].failure_counts == {"protocol": 1}
        assert relay.health["closer"].failure_counts == {"closed": 1}
        assert relay.health["silent"].failure_counts == {"timeout": 1}
        assert s["upstream_good_connections"] == 1 and relay.counters.internal_errors == 0


def test_a_declined_request_fails_over_without_marking_the_upstream_down():
    def refuse(conn: socket.socket) -> None:
        conn.recv(16)
        conn.sendall(b"\x05\x00")
        conn.recv(64)
        conn.sendall(b"\x05\x05\x00\x01" + bytes(6))  # connection refused by the destination
        conn.recv(1)

    refusing, good = Upstream(refuse), FakeSocks5()
    ups = (upstream_at("refusing", refusing.addr), good.config("good"))
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("refusing", "good")),)) as (relay, addr):
        roundtrip(addr, b"x", b"x")
        s = stats(relay)
        assert s["upstream_refusing_declined"] == 1 and s["upstream_refusing_up"] == 1


def test_an_endless_http_response_header_fails_the_attempt():
    endless, good = hostile("endless header"), FakeSocks5()
    ups = (upstream_at("endless", endless.addr, kind=HTTP), good.config("good"))
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("endless", "good")),)) as (relay, addr):
        roundtrip(addr, b"x", b"x")
        assert stats(relay)["upstream_endless_failures"] == 1


def test_an_upstream_by_name_is_resolved_when_the_worker_starts():
    proxy = FakeSocks5()
    named = UpstreamConfig("a", SOCKS5, "localhost", proxy.server.addr[1], check_interval=0)
    with running(DST, upstreams=(named,), routes=(RouteRule("r", ("a",)),)) as (relay, addr):
        assert relay.addresses["a"] in (("127.0.0.1", proxy.server.addr[1]),
                                        ("::1", proxy.server.addr[1]))
        if relay.addresses["a"][0] == "127.0.0.1":
            roundtrip(addr, b"by name", b"by name")


def test_a_name_that_does_not_resolve_fails_over(monkeypatch):
    from tproxyd.relay import loop

    proxy = FakeSocks5()
    unresolved = UpstreamConfig("lost", SOCKS5, "lost.example", 1080, check_interval=0)
    real = loop.resolve
    monkeypatch.setattr(loop, "resolve", lambda u: None if u.name == "lost" else real(u))
    ups = (unresolved, proxy.config("b"))
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("lost", "b")),)) as (relay, addr):
        roundtrip(addr, b"x", b"x")
        assert relay.health["lost"].failure_counts == {"unresolved": 1}


def test_http_connect_upstream():
    seen = []

    def http_proxy(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        seen.append(head.split(b"\r\n")[0])
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        echo(conn)

    proxy = Upstream(http_proxy)
    ups = (upstream_at("web", proxy.addr, kind=HTTP),)
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("web",)),)) as (_, addr):
        roundtrip(addr, b"over http", b"over http")
    assert seen == [b"CONNECT 127.0.0.1:9 HTTP/1.1"]


def test_active_checks_bring_a_recovered_upstream_back_after_two_passes():
    port = closed_port()
    up = upstream_at("a", port, check_interval=0.2)
    with running(DST, upstreams=(up,), routes=(RouteRule("r", ("a",)),)) as (relay, _):
        wait_for(lambda: stats(relay)["upstream_a_checks_failed"] >= 1, "a failed check")
        assert stats(relay)["upstream_a_up"] == 0
        # something answers on the port now: a SOCKS5 greeting is all a check needs
        back = socket.create_server(port)
        try:
            def answer() -> None:
                while True:
                    try:
                        conn, _ = back.accept()
                    except OSError:
                        return
                    with conn, contextlib.suppress(OSError):  # a check ends with a reset
                        conn.recv(16)
                        conn.sendall(b"\x05\x00")
                        conn.recv(1)
            threading.Thread(target=answer, daemon=True).start()
            wait_for(lambda: stats(relay)["upstream_a_up"] == 1, "two passed checks", timeout=30)
            assert relay.health["a"].last_check_ok
        finally:
            back.close()


def test_udp_ends_and_bytes_count_by_route_and_via_like_tcp():
    """UdpRelay counts through the same Counters calls (the kernel test carries real UDP)."""
    from tproxyd.relay.loop import Counters

    c = Counters()
    c.ended("udp", End.UDP_EXPIRED, "corp", "a")
    c.moved("a", 100, 300)
    c.ended("udp", End.REJECTED, "ads", "reject")
    c.ended("tcp", End.CLIENT_FIN)
    c.moved("direct", 5, 0)
    out = c.to_json()
    assert out["connections|udp|corp|a|udp_expired"] == 1
    assert out["connections|udp|ads|reject|rejected"] == 1
    assert out["connections|tcp|direct|direct|client_fin"] == 1
    assert (out["bytes|up|a"], out["bytes|down|a"], out["bytes|up|direct"]) == (100, 300, 5)
    assert out["end_udp_udp_expired"] == out["end_udp_rejected"] == out["end_tcp_client_fin"] == 1
    assert c.udp_expired == 1  # the derived totals still read the flat counts


def test_stats_count_the_bytes_of_open_udp_sessions_by_via():
    from tproxyd.relay.loop import Settings
    from tproxyd.relay.udp import Session

    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False))
    try:
        session = Session(("198.18.1.2", 5000), ("198.18.2.2", 53), None, None, relay.now)
        session.bytes_up, session.bytes_down = 30, 300
        relay.udp.sessions[(session.client, session.dst)] = session
        s = relay.stats()
        relay.udp.sessions.clear()
    finally:
        relay.close()
    assert (s["bytes|up|direct"], s["bytes|down|direct"]) == (30, 300)


@pytest.mark.parametrize(("how", "end"), [("reset", End.CLIENT_RESET), ("close", End.CLIENT_FIN)])
def test_a_client_gone_during_the_handshake_ends_at_once_and_frees_the_upstream(how, end):
    """A client that resets or closes while its upstream has not answered yet is noticed at
    once: its slot and its upstream connection go, long before connect_timeout."""
    upstream_closed = threading.Event()

    def silent(conn: socket.socket) -> None:
        conn.recv(16)  # the greeting; never answered
        with contextlib.suppress(ConnectionResetError):  # closed with a FIN or a reset
            conn.recv(16)
        upstream_closed.set()

    proxy = Upstream(silent)
    ups = (upstream_at("slow", proxy.addr, connect_timeout=60),)
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("slow",)),)) as (relay, addr):
        c = socket.create_connection(addr, timeout=DEADLINE)
        wait_for(lambda: relay.counters.active == 1, "the connection to be relayed")
        if how == "reset":
            reset(c)
        c.close()
        wait_for(lambda: relay.counters.active == 0, "the connection to end", timeout=5)
        assert relay.counters.tcp_ends[end] == 1
        assert upstream_closed.wait(5), "the upstream's connection was kept"
        s = stats(relay)
        assert s["upstream_slow_up"] == 1 and s["upstream_slow_failures"] == 0  # not its fault
        assert s["upstream_slow_active"] == 0
    assert not proxy.errors


def gated_socks5(go: threading.Event) -> Upstream:
    """A SOCKS5 upstream (no auth) that answers the greeting only once go is set, then
    answers the client's bytes with their count and sha256 at its EOF."""

    def slow(conn: socket.socket) -> None:
        recv_exactly(conn, 3)  # no-auth greeting
        go.wait(DEADLINE)
        conn.sendall(b"\x05\x00")
        recv_exactly(conn, 10)  # CONNECT to an IPv4 address
        conn.sendall(b"\x05\x00\x00\x01" + bytes(6))
        digest_until_eof(conn)

    return Upstream(slow)


def test_early_bytes_and_a_half_close_wait_for_a_slow_handshake_without_spinning():
    """A client that sends its request and its FIN before the upstream answers: the bytes and
    the FIN reach the server after the handshake, the answer comes back, and the loop sleeps
    meanwhile (the client is not watched once its FIN is in)."""
    go = threading.Event()
    proxy = gated_socks5(go)
    payload = b"GET / HTTP/1.0\r\n\r\n" * 100
    ups = (upstream_at("slow", proxy.addr),)
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("slow",)),)) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            time.sleep(0.3)  # the relay has read the bytes and the FIN by now
            turns = relay.iterations
            time.sleep(0.5)
            assert relay.iterations - turns < 20, "the loop spins on a client it cannot serve"
            go.set()
            answer = recv_all(c)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
        wait_for(lambda: relay.counters.active == 0, "the connection to end")
        assert relay.counters.tcp_ends[End.CLIENT_FIN] == 1
        assert stats(relay)["upstream_slow_sent"] == len(payload)
    assert not proxy.errors


def test_more_early_bytes_than_the_relay_keeps_wait_in_the_kernel_and_arrive_whole():
    """Past EARLY_LIMIT the client is no longer read (nor watched: no spin) until the tunnel
    is open; then every byte arrives, in order."""
    go = threading.Event()
    proxy = gated_socks5(go)
    payload = os.urandom(EARLY_LIMIT * 4 + 123)
    ups = (upstream_at("slow", proxy.addr),)
    with running(DST, upstreams=ups, routes=(RouteRule("r", ("slow",)),)) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(payload)  # the kernel's buffers hold what the relay does not take
            c.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            (conn,) = relay.connections
            assert conn.up.pending == EARLY_LIMIT
            turns = relay.iterations
            time.sleep(0.5)
            assert relay.iterations - turns < 20, "the loop spins on a client it cannot serve"
            go.set()
            answer = recv_all(c)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    assert not proxy.errors
