"""relay/selector.py: register() and modify() answer as the stdlib's, poll() and keys give what
select() gives; forget() drops a socket closed right after, without an EPOLL_CTL_DEL, and the
kernel's epoll agrees: the descriptor, reused, is watched afresh and the old one is never
reported."""

from __future__ import annotations

import select
import selectors
import socket

import pytest

from tests.unit.test_relay_loop import DEADLINE, Upstream, echo, recv_all, reset, running, wait_for
from tproxyd.relay.selector import Selector

READ = selectors.EVENT_READ


def test_a_forgotten_socket_closed_is_gone_from_epoll_and_its_descriptor_can_be_watched_again():
    sel = Selector()
    a, b = socket.socketpair()
    b.send(b"x")  # a is readable
    sel.register(a, READ, "old")
    fd = a.fileno()
    sel.forget(a)
    a.close()
    assert fd not in sel.get_map()
    assert sel.select(0) == []  # the close took it out of epoll: nothing reported
    c, d = socket.socketpair()
    reused = c if c.fileno() == fd else d
    assert reused.fileno() == fd  # the lowest free descriptor: the one just closed
    sel.register(reused, READ, "new")  # EEXIST if epoll still had the old one
    peer = d if reused is c else c
    peer.send(b"y")
    events = sel.select(1)
    assert [(key.fd, key.data) for key, _ in events] == [(fd, "new")]
    for s in (b, c, d):
        s.close()
    sel.close()


def test_forgetting_a_socket_never_registered_does_nothing():
    sel = Selector()
    a, b = socket.socketpair()
    sel.register(b, READ, "b")
    sel.forget(a)
    assert list(sel.get_map()) == [b.fileno()]
    a.close()
    b.close()
    sel.close()


def test_ended_connections_leave_nothing_watched_and_their_descriptors_serve_new_ones():
    """Connections ended by FINs (both sockets watched to the end) and by resets: the relay's
    selector is back to its own sockets, and new connections, on the same descriptors, relay
    their bytes (a stale epoll entry would make their registration fail or misreport)."""
    up = Upstream(echo)
    with running(up.addr) as (relay, addr):
        own = set(relay.selector.get_map())
        for round_ in range(3):
            for i in range(20):
                with socket.create_connection(addr, timeout=DEADLINE) as c:
                    c.sendall(b"%d.%d" % (round_, i))
                    if i % 2:
                        assert c.recv(64) == b"%d.%d" % (round_, i)
                        reset(c)
                    else:
                        c.shutdown(socket.SHUT_WR)
                        assert recv_all(c) == b"%d.%d" % (round_, i)
            wait_for(lambda: relay.counters.active == 0, "the connections to end")
            assert set(relay.selector.get_map()) == own
        assert relay.counters.accepted == 60 and relay.counters.internal_errors == 0
        assert relay.counters.register_errors == 0
    assert all(isinstance(e, ConnectionResetError) for e in up.errors)  # the reset half


WRITE = selectors.EVENT_WRITE


def test_register_and_modify_answer_as_the_stdlibs_do():
    """The one-call register() and modify() against the stdlib's EpollSelector, step by step:
    the same keys, the same events reported, the same errors."""
    a, b = socket.socketpair()
    b.send(b"x")  # a is readable (and writable)
    ours, theirs = Selector(), selectors.EpollSelector()

    def same(step) -> None:
        got = []
        for sel in (ours, theirs):
            try:
                result = step(sel)
            except Exception as exc:
                got.append(type(exc))
            else:
                got.append(result)
            got.append([(k.fd, k.events, k.data, m) for k, m in sel.select(0)])
            got.append(sorted((k.fd, k.events, k.data) for k in sel.get_map().values()))
        assert got[:3] == got[3:], got

    same(lambda sel: sel.register(a, READ, ("conn", 0))[1:])
    same(lambda sel: sel.register(a, READ, "again"))  # KeyError: registered already
    same(lambda sel: sel.modify(a, READ | WRITE, ("conn", 0))[1:])
    same(lambda sel: sel.modify(a, READ | WRITE, ("conn", 1))[1:])  # data alone changes
    same(lambda sel: sel.modify(a, READ | WRITE, ("conn", 1))[1:])  # nothing changes
    same(lambda sel: sel.modify(a, WRITE, ("conn", 1))[1:])
    same(lambda sel: sel.modify(b, READ, None))  # KeyError: not registered
    same(lambda sel: sel.register(b, 0, None))  # ValueError: no events
    same(lambda sel: sel.register(b, 4, None))  # ValueError: not an event
    with pytest.raises(ValueError):  # stricter than the stdlib's, which takes it silently
        ours.modify(a, 8, None)
    same(lambda sel: sel.unregister(a).fd)
    for s in (a, b):
        s.close()
    ours.close()
    theirs.close()


def test_poll_and_keys_give_what_select_gives():
    """poll() is epoll's raw answer and keys the registrations: the relay's loop turns them into
    select()'s (key, events), errors and hang-ups waking both directions as select() does."""
    a, b = socket.socketpair()
    sel = Selector()
    try:
        sel.register(a, READ | WRITE, "a")
        assert sel.poll(0) == [(a.fileno(), select.EPOLLOUT)]  # writable, nothing to read
        b.send(b"x")
        assert sel.poll(0) == [(a.fileno(), select.EPOLLIN | select.EPOLLOUT)]
        assert sel.keys[a.fileno()] is sel.get_key(a)
        assert [(k.data, m) for k, m in sel.select(0)] == [("a", READ | WRITE)]
        sel.modify(a, READ, "a")
        b.recv(0)
        a.recv(1)
        assert sel.poll(0.01) == []  # the timeout passes: nothing to report
        b.close()  # a's peer gone: a hang-up, readable
        (fd, flags), = sel.poll(0)
        assert fd == a.fileno() and flags & select.EPOLLIN
    finally:
        sel.close()
        a.close()
        if b.fileno() != -1:
            b.close()
