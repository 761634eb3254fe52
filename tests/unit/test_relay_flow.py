"""One flow's byte accounting and pipe use on socket pairs, without a loop (issue 11)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

from tproxyd.relay.flow import CHUNK, SPLICE, Flow


def _pair(sndbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return a, b


@pytest.mark.skipif(not SPLICE, reason="needs os.splice")
def test_bytes_counted_equal_bytes_carried_when_a_slow_reader_takes_part_of_the_first_chunk():
    """The first full read moves the flow to splice while dst takes only part of it: the part
    sent then is counted too."""
    src, feeder = _pair()
    dst, reader = _pair(sndbuf=4096)  # a slow reader: its socket takes a few KiB at a time
    payload = os.urandom(4 * CHUNK + 123)
    feeder.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sender = threading.Thread(target=lambda: (feeder.sendall(payload), feeder.close()))
    sender.start()
    flow = Flow(src, dst)
    got = bytearray()
    reader.settimeout(0.05)
    while not flow.finished:
        flow.pump()
        with contextlib.suppress(TimeoutError):
            got += reader.recv(1 << 20)
    sender.join()
    dst.close()
    while data := reader.recv(1 << 20):
        got += data
    assert flow.pipe is not None  # it did become a splice flow
    assert bytes(got) == payload
    assert flow.bytes == len(payload)
    flow.close()
