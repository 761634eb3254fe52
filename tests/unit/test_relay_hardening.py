"""The relay's defences against its own failures and against greedy clients, on loopback sockets
without root (issue 11). Kernel-side counterparts are in tests/kernel/test_relay_limits.py."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import resource
import socket
import threading
import time

import pytest

from tests.unit.test_relay_loop import (
    DEADLINE,
    Upstream,
    closed_port,
    echo,
    expect_reset,
    running,
    wait_for,
)
from tproxyd.relay.connection import Connection
from tproxyd.relay.flow import SPLICE
from tproxyd.relay.loop import Relay, Settings

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def test_a_connection_whose_registration_fails_is_ended_not_leaked():
    """epoll can refuse a descriptor (ENOMEM, max_user_watches): the connection is reset and
    released, not left counted in the set with nobody watching it."""
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        real = relay.selector.register

        def refusing(fileobj, events, data=None):
            if isinstance(data, tuple) and isinstance(data[0], Connection):
                raise OSError(errno.ENOSPC, "max_user_watches")
            return real(fileobj, events, data)

        relay.selector.register = refusing
        with pytest.raises(ConnectionResetError), socket.create_connection(addr, timeout=3) as c:
            c.recv(1)
        wait_for(lambda: relay.counters.closed == 1, "the connection to be ended")
        assert relay.counters.active == 0 and not relay.connections
        relay.selector.register = real
        with socket.create_connection(addr, timeout=DEADLINE) as c:  # the relay goes on
            c.sendall(b"k")
            assert c.recv(1) == b"k"


def test_a_bug_in_a_timer_costs_that_timer_not_the_relay():
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        fired = threading.Event()

        def broken(arg: object, when: float) -> None:
            fired.set()
            raise RuntimeError("a bug in a timer")

        relay.at(0.0, broken, None)
        relay.wake()
        assert fired.wait(DEADLINE)
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(b"t")
            assert c.recv(1) == b"t"
        assert relay.counters.internal_errors == 1


def test_whatever_escapes_the_loop_still_closes_the_relay(tmp_path):
    stats = str(tmp_path / "relay.sock")
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False,
                           stats_path=stats), original_dst=lambda s: ("127.0.0.1", 9))
    relay.open()
    listeners = list(relay.listeners)

    def broken(timeout=None):
        raise RuntimeError("the selector broke")

    relay.selector.poll = broken
    with pytest.raises(RuntimeError):
        relay.run()
    assert all(s.fileno() == -1 for s in listeners) and not os.path.exists(stats)


def test_failed_connections_log_at_most_a_line_a_second_and_say_what_was_left_out(caplog):
    """A client can make connections fail at will (here: a closed port); the log cannot grow
    with them. The next line after a quiet second counts what was not logged."""
    caplog.set_level(logging.INFO, logger="tproxyd.relay")
    with running(closed_port()) as (relay, addr):
        for _ in range(30):
            expect_reset(addr)
        wait_for(lambda: relay.counters.closed == 30, "30 failures")
        time.sleep(1.1)
        expect_reset(addr)
        wait_for(lambda: relay.counters.closed == 31, "one more failure")
    lines = [r.getMessage() for r in caplog.records if "connect to" in r.getMessage()]
    assert 2 <= len(lines) <= 5, lines
    left_out = sum(int(m.group(1)) for line in lines
                   if (m := re.search(r"\((\d+) more like it", line)))
    assert len(lines) + left_out == 31, lines


def fill(sock: socket.socket, quiet: float = 0.3, most: float = 5.0) -> int:
    """Send until the other side has taken nothing for `quiet` seconds; returns bytes sent."""
    sock.setblocking(False)
    chunk, sent = b"x" * (1 << 16), 0
    start = stalled = time.monotonic()
    while time.monotonic() - start < most:
        try:
            sent += sock.send(chunk)
            stalled = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - stalled > quiet:
                break
            time.sleep(0.01)
    return sent


def pipe_capacity(relay: Relay) -> list[int]:
    """The capacity of every pipe the relay's flows hold, asked of the kernel."""
    while True:
        try:
            flows = [f for c in list(relay.connections) for f in (c.up, c.down)]
            return [fcntl.fcntl(f.pipe[1], F_GETPIPE_SZ) for f in flows if f.pipe is not None]
        except (RuntimeError, OSError, TypeError):  # the loop changed them meanwhile: again
            time.sleep(0.01)


@pytest.mark.skipif(not SPLICE, reason="needs os.splice")
def test_stalled_readers_hold_no_more_pipe_memory_than_the_budget():
    """Servers that never read: every bulk flow's pipe fills. The pipes' capacity, all flows
    together, stays within max_pipe_memory; past it flows get a small pipe, then copy."""
    budget = 4 << 20
    release = threading.Event()
    up = Upstream(lambda conn: release.wait(4 * DEADLINE))
    clients = []
    try:
        with running(up.addr, max_pipe_memory=budget) as (relay, addr):
            for _ in range(12):
                c = socket.create_connection(addr, timeout=DEADLINE)
                clients.append(c)
                assert fill(c) > 1 << 20
            wait_for(lambda: relay.counters.active == 12, "12 connections")
            held = pipe_capacity(relay)
            assert len(held) >= 4 and sum(held) <= budget, held
            stats = relay.stats()
            assert stats["pipe_memory"] == sum(held)
            assert stats["pipes_small"] + stats["pipes_refused"] > 0
            release.set()  # the servers close unread: resets end every connection
            wait_for(lambda: relay.counters.active == 0, "the connections to end")
            assert relay.stats()["pipe_memory"] == 0
    finally:
        release.set()
        for c in clients:
            c.close()


def test_out_of_descriptors_a_stats_request_is_answered_and_the_loop_does_not_spin(tmp_path):
    """Every descriptor of the process taken: the relay's spare one answers a stats reader
    (which used to stay queued, ready on every turn: a spin), and accepting pauses."""
    up = Upstream(echo)
    with running(up.addr, tmp_path=tmp_path) as (relay, addr):
        client, reader = socket.socket(), socket.socket(socket.AF_UNIX)  # made first
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            client.settimeout(DEADLINE)
            client.connect(addr)
            wait_for(lambda: relay.counters.fd_shortages > 0, "the relay to run short")
            reader.settimeout(DEADLINE)
            reader.connect(str(tmp_path / "relay.sock"))
            answer = reader.recv(1 << 16)
            turns = relay.iterations
            time.sleep(1.0)
            assert relay.iterations - turns < 100, "the loop spins while short of descriptors"
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert b'"fd_shortages": 1' in answer
        client.sendall(b"s")
        assert client.recv(1) == b"s"  # accepted once descriptors are back
        client.close()
        reader.close()


def test_one_client_cannot_take_every_connection_slot():
    """Past max_connections_per_client that client's new connections are reset and counted;
    another client (another source address) is still served."""
    up = Upstream(echo)
    with running(up.addr, max_connections_per_client=2) as (relay, addr):
        kept = [socket.create_connection(addr, timeout=DEADLINE) for _ in range(2)]
        for k in kept:
            k.sendall(b"a")
            assert k.recv(1) == b"a"
        expect_reset(addr)
        wait_for(lambda: relay.stats()["end_tcp_over_limit"] == 1, "the refusal to be counted")
        with socket.create_connection(addr, timeout=DEADLINE,
                                      source_address=("127.0.0.2", 0)) as other:
            other.sendall(b"b")
            assert other.recv(1) == b"b"
        kept.pop().close()
        wait_for(lambda: relay.counters.active == 1, "a slot to free")
        with socket.create_connection(addr, timeout=DEADLINE) as again:  # its slot is back
            again.sendall(b"c")
            assert again.recv(1) == b"c"
        for k in kept:
            k.close()
        assert relay.stats()["end_tcp_over_limit"] == 1
