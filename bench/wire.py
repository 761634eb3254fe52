"""Kernel timestamps of one TCP port's packets on the gateway's lan0 and wan0 (AF_PACKET), for
bench.sniffing --gap: when the client's handshake ACK and first bytes arrive, and when the
relay's SYN to the server leaves. Runs inside the gateway's namespace:

    python -m bench.wire SECONDS PORT OUT.json

Writes {"packets": [[time, interface, src port, dst port, tcp flags, payload bytes], ...],
"dropped": N} (IPv4 only; N: packets the kernel dropped for this socket, PACKET_STATISTICS).
gaps() reads the packets.
"""

from __future__ import annotations

import bisect
import json
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # linux/socket.h; the socket module does not name it
SYN, ACK = 0x02, 0x10
SOL_PACKET, PACKET_STATISTICS = 263, 6  # linux/if_packet.h: struct tpacket_stats, read once


def capture(seconds: float, port: int) -> dict:
    rows: list[list] = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.settimeout(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, anc, _, addr = s.recvmsg(128, 64)
            except TimeoutError:
                continue
            if addr[0] not in ("lan0", "wan0") or data[12:14] != b"\x08\x00" or data[23] != 6:
                continue
            ihl = (data[14] & 15) * 4
            length = struct.unpack_from("!H", data, 16)[0]
            tcp = 14 + ihl
            sport, dport = struct.unpack_from("!HH", data, tcp)
            if port not in (sport, dport):
                continue
            stamp = next(sec + nsec / 1e9 for _, kind, val in anc if kind == SO_TIMESTAMPNS
                         for sec, nsec in [struct.unpack("qq", val[:16])])
            rows.append([stamp, addr[0], sport, dport, data[tcp + 13],
                         length - ihl - (data[tcp + 12] >> 4) * 4])
        _, dropped = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return {"packets": rows, "dropped": dropped}


def gaps(rows: list[list], port: int) -> list[tuple[float, float, float]]:
    """Per connection (one at a time), in seconds: the client's handshake ACK to its first
    bytes; that ACK to the relay's SYN to the server; the first bytes to that SYN. A connection
    with a packet missing (the capture dropped it) is left out: its handshake ACK must come
    before its first bytes, and its relay SYN before the next client's SYN."""
    conns: dict[int, dict[str, float]] = {}
    syns = []
    for stamp, where, sport, dport, flags, size in rows:
        if where == "lan0" and dport == port:
            c = conns.setdefault(sport, {})
            if flags & SYN:
                c.setdefault("syn", stamp)
            elif "syn" in c and size == 0 and "ack" not in c and "data" not in c:
                c["ack"] = stamp
            elif size and "data" not in c:
                c["data"] = stamp
        elif where == "wan0" and dport == port and flags & (SYN | ACK) == SYN:
            syns.append(stamp)
    syns.sort()
    starts = sorted(c["syn"] for c in conns.values() if "syn" in c)
    out = []
    for c in conns.values():
        if len(c) != 3:
            continue
        i = bisect.bisect_left(syns, c["syn"])
        j = bisect.bisect_right(starts, c["syn"])  # the next connection's SYN, if any
        if i < len(syns) and (j == len(starts) or syns[i] < starts[j]):
            out.append((c["data"] - c["ack"], syns[i] - c["ack"], syns[i] - c["data"]))
    return out


if __name__ == "__main__":
    with open(sys.argv[3], "w") as f:
        json.dump(capture(float(sys.argv[1]), int(sys.argv[2])), f)
