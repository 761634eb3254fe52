"""Each way a relayed connection ends is counted under its own name: the access log's `end`
values (issue 14), served flat as end_tcp_<end> / end_udp_<end> in the stats reply (issue 11,
item 12). UDP ends are exercised through the kernel in tests/kernel/test_udp.py."""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from tests.unit.test_relay_loop import (
    DEADLINE,
    Upstream,
    closed_port,
    echo,
    expect_reset,
    recv_all,
    reset,
    running,
    wait_for,
)
from tproxyd.relay.ends import End
from tproxyd.relay.loop import Relay, Settings, read_stats
from tproxyd.relay.sockopts import SockaddrError

END_NAMES = ["client_fin", "server_fin", "client_reset", "server_reset", "idle_timeout",
             "connect_timeout", "connect_refused", "unreachable", "upstream_error", "rejected",
             "over_limit", "loop", "drained", "udp_expired", "udp_evicted", "udp_icmp"]


def only(relay: Relay, end: str) -> bool:
    """The relay counted exactly one ended connection, and it ended this way."""
    ends = {k: v for k, v in relay.stats().items() if k.startswith("end_tcp_") and v}
    return ends == {f"end_tcp_{end}": 1}


def test_the_ends_are_exactly_the_access_logs_names():
    assert [e.value for e in End] == END_NAMES


def test_the_stats_reply_has_a_flat_integer_per_end_and_protocol(tmp_path):
    with running(closed_port(), tmp_path=tmp_path) as (_relay, _addr):
        stats = read_stats(str(tmp_path / "relay.sock"))
    for name in END_NAMES:
        assert stats[f"end_tcp_{name}"] == 0 and stats[f"end_udp_{name}"] == 0
    for key in ("failed", "resets", "refused", "loops", "connect_timeouts", "idle_timeouts",
                "udp_expired", "udp_evicted", "udp_icmp_errors"):  # what older readers use
        assert stats[key] == 0


def test_client_fin_first():
    def server(conn):
        assert recv_all(conn) == b"request"
        conn.sendall(b"answer")

    up = Upstream(server)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"request")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"answer"
        wait_for(lambda: only(relay, "client_fin"), "a client_fin end")


def test_server_fin_first():
    def server(conn):
        conn.sendall(b"bye")

    up = Upstream(server)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        assert recv_all(c) == b"bye"
        c.close()
        wait_for(lambda: only(relay, "server_fin"), "a server_fin end")


def test_client_reset():
    up = Upstream(lambda conn: (conn.sendall(b"ready"), recv_all(conn)))
    with running(up.addr) as (relay, addr):
        c = socket.create_connection(addr, timeout=DEADLINE)
        assert c.recv(5) == b"ready"
        reset(c)
        c.close()
        wait_for(lambda: only(relay, "client_reset"), "a client_reset end")
        assert relay.counters.resets == 1 and relay.counters.failed == 0


def test_server_reset():
    def server(conn):
        conn.recv(10)
        reset(conn)

    up = Upstream(server)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"hi")
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        wait_for(lambda: only(relay, "server_reset"), "a server_reset end")
        assert relay.counters.resets == 1 and relay.counters.failed == 0


def test_connect_refused():
    with running(closed_port()) as (relay, addr):
        expect_reset(addr)
        wait_for(lambda: only(relay, "connect_refused"), "a connect_refused end")
        assert relay.counters.failed == 1


def test_idle_timeout():
    up = Upstream(echo)
    with running(up.addr, idle_timeout=0.3) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        wait_for(lambda: only(relay, "idle_timeout"), "an idle_timeout end")


def test_over_limit():
    up = Upstream(echo)
    with running(up.addr, max_connections=1) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as kept:
        kept.sendall(b"a")
        assert kept.recv(1) == b"a"
        expect_reset(addr)
        wait_for(lambda: relay.stats()["end_tcp_over_limit"] == 1, "an over_limit end")
        assert relay.counters.refused == 1


def test_loop():
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False))
    (addr,) = relay.open()
    relay.original_dst = lambda s: addr
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        expect_reset(addr)
        wait_for(lambda: only(relay, "loop"), "a loop end")
        assert relay.counters.loops == 1
    finally:
        relay.stop()
        thread.join(5)


def test_drained_by_a_stop():
    hold = threading.Event()
    up = Upstream(lambda conn: (conn.sendall(b"partial"), hold.wait(DEADLINE)))
    try:
        with running(up.addr) as (relay, addr), \
                socket.create_connection(addr, timeout=DEADLINE) as c:
            assert c.recv(7) == b"partial"
        assert only(relay, "drained")
    finally:
        hold.set()


@pytest.mark.parametrize(("error", "end"), [
    (OSError(errno.ENOTCONN, "client gone before we asked"), "client_reset"),
    (SockaddrError("garbage from SO_ORIGINAL_DST"), "upstream_error"),
], ids=["client gone", "unreadable sockaddr"])
def test_an_error_finding_the_original_destination(error, end):
    def failing(sock):
        raise error

    with running(("127.0.0.1", 9)) as (relay, addr):
        relay.original_dst = failing
        expect_reset(addr)
        wait_for(lambda: only(relay, end), f"a {end} end")
