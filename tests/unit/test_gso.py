"""relay/gso.py: the runs of datagrams one UDP_SEGMENT send carries. The kernel cuts a run's
payload at the segment size (its first datagram's length), so a run is right exactly when
that cut gives back its datagrams; property-tested against that cut."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxyd.relay import gso


def kernel_cut(run: list[bytes]) -> list[bytes]:
    """What the receiver gets from one send of run: one datagram, or the payload cut at the
    first datagram's length (UDP_SEGMENT), as the kernel does."""
    if len(run) == 1:
        return run
    size, payload = len(run[0]), b"".join(run)
    return [payload[i:i + size] for i in range(0, len(payload), size)]


sizes = st.one_of(st.integers(0, 3), st.sampled_from([100, 1200, 1400, 1452, 1453, 1500]),
                  st.integers(0, 9000))


@given(st.lists(sizes, max_size=200))
def test_runs_give_back_every_datagram_in_order_and_within_the_kernels_limits(lengths):
    datagrams = [bytes([i % 251]) * n for i, n in enumerate(lengths)]
    runs = gso.runs(datagrams)
    assert [d for run in runs for d in run] == datagrams  # all of them, in order
    for run in runs:
        assert kernel_cut(run) == run  # the receiver sees the same datagrams
        if len(run) > 1:
            assert 0 < len(run[0]) <= gso.MAX_SEGMENT
            assert len(run) <= gso.MAX_SEGMENTS
            assert sum(map(len, run)) <= gso.MAX_BYTES


def test_a_burst_of_equal_datagrams_is_one_send_per_64():
    burst = [b"x" * 1400] * 40 + [b"y" * 1400] * 3 + [b"z" * 700]
    assert [len(r) for r in gso.runs(burst)] == [44]
    assert [len(r) for r in gso.runs([b"x" * 1000] * 100)] == [64, 36]
    # a shorter datagram ends a run; a longer one starts the next
    assert [len(r) for r in gso.runs([b"a" * 10, b"b" * 5, b"c" * 10, b"d" * 20])] == [2, 1, 1]
    assert gso.runs([b"", b"", b"x"]) == [[b""], [b""], [b"x"]]


class RefusingSocket:
    """A socket whose segmented sends fail with `errno_` (a path without checksum offload says
    EIO, one whose MTU a segment exceeds EINVAL); plain sends are recorded."""

    def __init__(self, errno_: int):
        self.errno, self.sent = errno_, []

    def sendmsg(self, *args):
        raise OSError(self.errno, "refused")

    def send(self, data):
        self.sent.append(data)
        return len(data)

    def sendto(self, data, addr):
        self.sent.append(data)
        return len(data)

    def close(self):
        pass


@pytest.mark.parametrize("errno_", [errno.EIO, errno.EINVAL])
def test_a_path_that_refuses_segments_gets_the_burst_one_by_one_both_ways(errno_):
    """The kernel test cannot make a path refuse UDP_SEGMENT with datagrams that fit it; here
    the sockets do: the same datagrams still go, one by one, in order, counted, and the
    session stops trying segments."""
    from tproxyd.relay.loop import Relay, Settings
    from tproxyd.relay.udp import Session

    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False))
    try:
        up, down = RefusingSocket(errno_), RefusingSocket(errno_)
        session = Session(("198.18.1.2", 5000), ("198.18.2.2", 53), up, down, relay.now)
        relay.udp.sessions[(session.client, session.dst)] = session
        burst = [bytes([i]) * 1000 for i in range(10)] + [b"t" * 10]
        relay.udp._send_burst(session, burst)
        assert up.sent == burst and not session.gso
        session.gso = True
        relay.udp._send_down_run(session, burst)
        assert down.sent == burst and not session.gso
        c = relay.counters
        assert c.udp_datagrams_up == c.udp_datagrams_down == len(burst)
        assert c.udp_bytes_up == c.udp_bytes_down == sum(map(len, burst))
        assert c.udp_drops == c.udp_gso_sends == 0
        relay.udp.sessions.clear()
    finally:
        relay.close()
