"""The relay's loop and state machine on loopback sockets, without root: the original destination
is given by a function instead of the kernel, spoofing and marks are off. The same behaviour
is exercised through the real TPROXY path in tests/kernel/test_relay.py."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tproxyd.relay.connection import Connection, State
from tproxyd.relay.flow import SPLICE
from tproxyd.relay.loop import Relay, Settings, read_stats
from tproxyd.relay.sockopts import SockaddrError

DEADLINE = 10.0


def wait_for(predicate, what: str, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Upstream:
    """A loopback server; each accepted connection is handed to `handler` in its own thread."""

    def __init__(self, handler):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.addr = self.sock.getsockname()
        self.handler = handler
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.sock.fileno() < 0:
                    return  # closed
                time.sleep(0.01)  # out of descriptors (a test's doing): try again
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:  # reported by the test, never lost
            self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def running(upstream_addr, tmp_path=None, **overrides) -> Iterator[tuple[Relay, tuple]]:
    fields = dict(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False, mark=0)
    fields.update(overrides)
    if tmp_path is not None:
        fields["stats_path"] = str(tmp_path / "relay.sock")
    relay = Relay(Settings(**fields), original_dst=lambda s: upstream_addr)
    (addr,) = relay.open()
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        yield relay, addr
    finally:
        relay.stop()
        thread.join(5)
        assert not thread.is_alive(), "the relay loop did not stop"


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def digest_until_eof(conn: socket.socket) -> None:
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        h.update(data)
        n += len(data)
    conn.sendall(f"{n} {h.hexdigest()}\n".encode())


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("splice", [True, False] if SPLICE else [False])
def test_bytes_cross_exactly_both_ways(splice):
    payload = os.urandom(8 << 20)
    up = Upstream(echo)
    with running(up.addr, splice=splice) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(c)
            sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        wait_for(lambda: relay.counters.active == 0, "the connection to close")
        assert relay.counters.bytes_up == relay.counters.bytes_down == len(payload)
        assert relay.counters.resets == 0
    assert not up.errors


def test_client_half_close_still_gets_the_answer():
    up = Upstream(digest_until_eof)
    with running(up.addr) as (_relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"x" * 100_000)
        c.shutdown(socket.SHUT_WR)  # FIN toward the server; we still read
        answer = recv_all(c)
    assert answer == f"100000 {hashlib.sha256(b'x' * 100_000).hexdigest()}\n".encode()


def test_server_half_close_still_gets_the_clients_bytes():
    def server(conn):
        conn.sendall(b"hello\n")
        conn.shutdown(socket.SHUT_WR)
        got = recv_all(conn)
        assert got == b"after your FIN"

    up = Upstream(server)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        assert recv_all(c) == b"hello\n"  # the server's FIN reached us
        wait_for(lambda: any(x.state is State.SERVER_DONE for x in relay.connections),
                 "the server-done state")
        c.sendall(b"after your FIN")
        c.shutdown(socket.SHUT_WR)
        wait_for(lambda: relay.counters.closed == 1, "the connection to close")
    assert not up.errors


def expect_reset(addr: tuple) -> None:
    """The relay resets the connection: on loopback the RST can beat connect() itself."""
    with pytest.raises(ConnectionResetError), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        c.recv(1)


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_server_reset_reaches_the_client_as_reset():
    def server(conn):
        conn.recv(10)
        reset(conn)

    up = Upstream(server)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"hi")
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        wait_for(lambda: relay.counters.resets == 1, "the reset to be counted")


def test_client_reset_reaches_the_server_as_reset():
    seen = []

    def server(conn):
        conn.sendall(b"ready")
        try:
            conn.recv(10)
        except ConnectionResetError:
            seen.append("reset")

    up = Upstream(server)
    with running(up.addr) as (_relay, addr):
        c = socket.create_connection(addr, timeout=DEADLINE)
        assert c.recv(5) == b"ready"
        reset(c)
        c.close()
        wait_for(lambda: seen == ["reset"], "the server to see a reset")


def closed_port() -> tuple:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()  # nothing listens there now
    return addr


def test_refused_connect_resets_the_client():
    with running(closed_port()) as (relay, addr):
        expect_reset(addr)
        wait_for(lambda: relay.counters.failed == 1 and relay.counters.active == 0,
                 "the failure to be counted and the connection released")
        assert relay.counters.internal_errors == 0  # an OSError, handled as one


def test_idle_connections_are_reset():
    up = Upstream(echo)
    with running(up.addr, idle_timeout=0.3) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        with pytest.raises(ConnectionResetError):
            c.recv(10)  # nothing more is sent: the relay ends it
        assert relay.counters.idle_timeouts == 1


def test_busy_connections_are_not_idle():
    up = Upstream(echo)
    with running(up.addr, idle_timeout=0.5) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        for _ in range(15):  # 1.5 s of traffic, never 0.5 s quiet
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
            time.sleep(0.1)
        assert relay.counters.idle_timeouts == 0


def test_max_connections_refuses_with_reset_and_keeps_running():
    up = Upstream(echo)
    with running(up.addr, max_connections=2) as (relay, addr):
        kept = [socket.create_connection(addr, timeout=DEADLINE) for _ in range(2)]
        for k in kept:
            k.sendall(b"a")
            assert k.recv(1) == b"a"
        expect_reset(addr)
        assert relay.counters.refused == 1
        kept.pop().close()
        wait_for(lambda: relay.counters.active == 1, "a slot to free")
        with socket.create_connection(addr, timeout=DEADLINE) as again:
            again.sendall(b"b")
            assert again.recv(1) == b"b"
        for k in kept:
            k.close()


def test_a_connection_to_the_relay_itself_is_refused():
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False))
    (addr,) = relay.open()
    relay.original_dst = lambda s: addr  # as when a client asks for the gateway's relay port
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        expect_reset(addr)
        assert relay.counters.loops == 1 and relay.counters.active == 0
    finally:
        relay.stop()
        thread.join(5)


def test_backpressure_stops_reading_a_client_whose_server_does_not_read():
    release = threading.Event()

    def slow(conn):
        release.wait(DEADLINE)
        digest_until_eof(conn)

    payload = os.urandom(1 << 20) * 256  # 256 MiB offered
    up = Upstream(slow)
    with running(up.addr) as (_relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.settimeout(0.5)
        sent = 0
        with contextlib.suppress(TimeoutError, socket.timeout):
            while sent < len(payload):
                sent += c.send(payload[sent:sent + (1 << 20)])
        # Autotuned socket buffers (four of them, a few MiB each) and one pipe hold what was
        # accepted: a fraction of what was offered. A relay that buffered would take it all.
        assert sent < 64 << 20, f"the relay kept reading: {sent} bytes accepted"
        release.set()
        c.settimeout(DEADLINE)
        c.sendall(payload[sent:])
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_running_out_of_descriptors_pauses_accepting_without_spinning():
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        clients = [socket.socket() for _ in range(4)]  # made first: connect needs no new fd
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers = []
        try:
            # Not one descriptor more for anybody in this process: the limit caps fd numbers,
            # so the holes below the highest one are filled too. Then the relay's accept fails.
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            for c in clients:
                c.settimeout(DEADLINE)
                c.connect(addr)  # completes in the kernel's backlog
            wait_for(lambda: relay.counters.accept_errors > 0, "accept to fail with EMFILE")
            turns = relay.iterations
            time.sleep(1.0)
            assert relay.iterations - turns < 100, "the loop spins while accept fails"
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for i, c in enumerate(clients):  # once descriptors are back, the waiting ones go through
            c.sendall(bytes([i]))
            assert c.recv(1) == bytes([i])
            c.close()
        wait_for(lambda: relay.counters.active == 0, "the connections to close")
        assert relay.counters.accepted == 4


def test_stats_socket_answers_while_relaying(tmp_path):
    up = Upstream(echo)
    with running(up.addr, tmp_path=tmp_path) as (_relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"abc")
        assert c.recv(3) == b"abc"
        stats = read_stats(str(tmp_path / "relay.sock"))
        assert stats["active"] == 1 and stats["accepted"] == 1
        assert stats["bytes_up"] == stats["bytes_down"] == 3
        assert oct(os.stat(tmp_path / "relay.sock").st_mode & 0o777) == "0o600"


def test_connection_states_on_a_socket_pair():
    a_client, b_client = socket.socketpair()
    a_server, b_server = socket.socketpair()
    for s in (a_client, a_server):
        s.setblocking(False)
    conn = Connection(a_client, ("c", 1), a_server, ("s", 2), now=0.0, use_splice=SPLICE)
    assert conn.state is State.CONNECTING and conn.wanted_masks() == (0, 2)
    conn.on_event(1, 2, now=1.0)
    assert conn.state is State.RELAYING
    b_client.sendall(b"up")
    conn.on_event(0, 1, now=2.0)
    assert b_server.recv(10) == b"up" and conn.last_active == 2.0
    b_client.shutdown(socket.SHUT_WR)
    conn.on_event(0, 1, now=3.0)
    assert conn.state is State.CLIENT_DONE
    assert b_server.recv(10) == b""  # the FIN was passed on
    b_server.sendall(b"down")
    b_server.shutdown(socket.SHUT_WR)
    conn.on_event(1, 1, now=4.0)  # a short read ends the turn...
    assert b_client.recv(10) == b"down"
    conn.on_event(1, 1, now=4.1)  # ...and the selector, level-triggered, brings the FIN next
    assert conn.state is State.CLOSED
    conn.close(reset=False)  # the last FIN goes out with close(), not with a shutdown()
    assert b_client.recv(10) == b""
    conn.close(reset=True)  # runs once: the second call does nothing and does not raise
    assert a_client.fileno() == -1 and a_server.fileno() == -1


@pytest.mark.parametrize("error", [
    OSError(errno.ENOTCONN, "client gone before we asked"),
    SockaddrError("garbage from SO_ORIGINAL_DST"),
], ids=["oserror", "unreadable sockaddr"])
def test_an_error_finding_the_original_destination_costs_one_connection(error):
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        calls = []
        real = relay.original_dst

        def flaky(sock):
            calls.append(1)
            if len(calls) == 1:
                raise error
            return real(sock)

        relay.original_dst = flaky
        expect_reset(addr)
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(b"z")
            assert c.recv(1) == b"z"
        # one connection lost; which end it counts as: tests/unit/test_relay_ends.py
        assert sum(relay.counters.tcp_ends.values()) == 1


def test_a_bug_in_a_handler_is_caught_by_the_loop():
    """A bug costs the connection it hit, never the relay: the next one is served. (The bug
    is put in original_dst, an attribute: the compiled relay's methods cannot be replaced.)"""
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        real = relay.original_dst
        calls = []

        def broken(sock):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            return real(sock)

        relay.original_dst = broken
        with socket.create_connection(addr, timeout=DEADLINE) as hit:
            with contextlib.suppress(OSError):
                assert hit.recv(1) == b""  # closed: lost to the bug
            with socket.create_connection(addr, timeout=DEADLINE) as c:
                c.sendall(b"q")
                assert c.recv(1) == b"q"
        assert relay.counters.internal_errors == 1 and len(calls) == 2


def test_stopping_resets_connections_that_still_carry_data():
    hold = threading.Event()

    def server(conn):
        conn.sendall(b"partial")
        hold.wait(DEADLINE)

    up = Upstream(server)
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False),
                  original_dst=lambda s: up.addr)
    (addr,) = relay.open()
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            assert c.recv(7) == b"partial"
            relay.stop()
            thread.join(5)
            with pytest.raises(ConnectionResetError):  # not a clean EOF: the stream was cut
                c.recv(1)
    finally:
        hold.set()
        relay.stop()


def test_both_sockets_of_a_connection_have_nodelay_and_do_not_block():
    """The client socket gets TCP_NODELAY from the listener (inherited by accept), not from a
    setsockopt per connection; the outbound one is made non-blocking by socket() itself."""
    up = Upstream(echo)
    with running(up.addr) as (relay, addr), socket.create_connection(addr, timeout=DEADLINE) as c:
        c.sendall(b"n")
        assert c.recv(1) == b"n"
        (conn,) = relay.connections
        for sock in (conn.client, conn.server):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.gettimeout() == 0.0


def _outbound() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_the_clients_first_bytes_go_out_with_the_connect():
    """A client that spoke before the connect: its bytes are read ahead and sent as soon as
    connect() returns; the send succeeding is what proves the connection up (no wait for
    writability). On loopback the handshake completes inside connect(), as over the veth
    links of a gateway; a busy machine can defer it, so one success in a few tries proves it."""
    listener = socket.create_server(("127.0.0.1", 0))
    states = []
    for _ in range(5):
        a_client, b_client = socket.socketpair()
        a_client.setblocking(False)
        b_client.sendall(b"first")
        conn = Connection(a_client, ("c", 1), _outbound(), listener.getsockname(), now=0.0,
                          use_splice=SPLICE)
        conn.connect()
        states.append(conn.state)
        peer, _ = listener.accept()
        with peer, b_client:
            peer.settimeout(DEADLINE)
            if conn.state is State.CONNECTING:  # deferred handshake: the normal path sends
                assert conn.wanted_masks() == (0, 2) and conn.up.pending == 5
                conn.on_event(1, 2, now=1.0)
            assert peer.recv(10) == b"first"
            assert conn.state is State.RELAYING and conn.up.bytes == 5
            assert conn.wanted_masks() == (1, 1)  # both sides read now
            conn.close(reset=False)
        if states[-1] is State.RELAYING:
            break
    assert State.RELAYING in states
    listener.close()


def test_a_silent_client_waits_for_the_connect_and_nothing_is_read_early():
    """Server-speaks-first protocols: no bytes in hand, so the connect completes the usual way
    (writability, SO_ERROR) and the handshake's ACK is not delayed."""
    listener = socket.create_server(("127.0.0.1", 0))
    a_client, b_client = socket.socketpair()
    a_client.setblocking(False)
    conn = Connection(a_client, ("c", 1), _outbound(), listener.getsockname(), now=0.0,
                      use_splice=SPLICE)
    conn.connect()
    assert conn.state is State.CONNECTING and conn.wanted_masks() == (0, 2)
    peer, _ = listener.accept()  # returns only once the handshake's last ACK arrived
    with peer, b_client:
        conn.on_event(1, 2, now=1.0)
        assert conn.state is State.RELAYING
        peer.sendall(b"220 hello\r\n")
        conn.on_event(1, 1, now=2.0)
        assert b_client.recv(20) == b"220 hello\r\n"
        conn.close(reset=False)
    listener.close()


def test_refused_connect_with_the_clients_bytes_in_hand_resets_the_client():
    with running(closed_port()) as (relay, addr):
        with pytest.raises(ConnectionResetError), \
                socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")  # usually read ahead before the connect
            c.recv(1)
        wait_for(lambda: relay.counters.failed == 1 and relay.counters.active == 0,
                 "the failure to be counted and the connection released")


def test_a_stop_before_the_loop_runs_is_not_lost():
    """A SIGTERM between the handler's install and run() (the worker freezes its objects
    there) stopped nothing: run() set itself running again and served on."""
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False,
                           mark=0), original_dst=lambda s: ("127.0.0.1", 9))
    relay.open()
    relay.stop()
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "run() served on after stop()"
    assert relay.listeners == []  # and closed what it had opened
