"""bench/wire.py's reading of a capture (bench.sniffing --gap): which packets are the client's
handshake ACK, its first bytes and the relay's SYN to the server, per connection."""

from __future__ import annotations

import pytest

from bench.wire import ACK, SYN, gaps

PORT = 7200


def connection(t: float, client_port: int, first_bytes_after: float, syn_after: float) -> list:
    """One connection's packets as capture() writes them, t the client's SYN."""
    ack = t + 0.000020
    return [[t, "lan0", client_port, PORT, SYN, 0],
            [t + 0.000010, "lan0", PORT, client_port, SYN | ACK, 0],  # the relay's SYN-ACK
            [ack, "lan0", client_port, PORT, ACK, 0],
            [ack + first_bytes_after, "lan0", client_port, PORT, ACK | 0x08, 517],
            [ack + syn_after, "wan0", 40000 + client_port, PORT, SYN, 0],
            [ack + syn_after + 0.000010, "wan0", PORT, 40000 + client_port, SYN | ACK, 0],
            [ack + syn_after + 0.000020, "wan0", 40000 + client_port, PORT, ACK | 0x08, 517]]


def test_gaps_take_each_connection_apart():
    rows = connection(1.0, 1001, 0.000018, 0.000060) + connection(1.01, 1002, 0.000011, 0.000050)
    got = sorted(gaps(rows, PORT))
    want = sorted([(0.000018, 0.000060, 0.000042), (0.000011, 0.000050, 0.000039)])
    assert got == [pytest.approx(w, abs=1e-9) for w in want]


def test_a_connection_seen_in_part_is_left_out():
    rows = connection(1.0, 1001, 0.000018, 0.000060)
    cut = [r for r in rows if r[5] == 0]  # its first bytes were not captured
    assert gaps(cut, PORT) == []
    assert gaps([r for r in rows if r[1] == "lan0"], PORT) == []  # no SYN to the server seen


def test_a_lost_handshake_ack_or_relay_syn_never_pairs_other_packets():
    """The capture may drop packets: a later pure ACK is not the handshake's, and a connection
    whose relay SYN was lost does not borrow the next connection's."""
    first = connection(1.0, 1001, 0.000018, 0.000060)
    no_ack = [r for r in first if not (r[1] == "lan0" and r[2] == 1001 and r[5] == 0
                                        and r[4] == ACK)]
    echo_ack = [first[3][0] + 0.0002, "lan0", 1001, PORT, ACK, 0]  # the client ACKs the echo
    assert gaps([*no_ack, echo_ack], PORT) == []
    second = connection(1.01, 1002, 0.000011, 0.000050)
    no_syn = [r for r in first if not (r[1] == "wan0" and r[4] == SYN)]
    assert [round(g * 1e6) for g in gaps(no_syn + second, PORT)[0]] == [11, 50, 39]
