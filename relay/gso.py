"""UDP segmentation offload (UDP_SEGMENT, Linux 4.18): several datagrams of one session in one
sendmsg.

The relay reads a burst of datagrams per readiness event; those of one session go out with one
sendmsg carrying a UDP_SEGMENT control message (the segment size), and the kernel cuts the
payload back into the same datagrams. One syscall, one route lookup and one pass through
netfilter on the way out instead of one each per datagram. The datagrams arrive as they were
sent: the same boundaries, the same order.

The kernel takes a run of datagrams that are all gso_size long but the last (which may be
shorter), at most UDP_MAX_SEGMENTS of them, each fitting the path's MTU. runs() cuts a burst
into such runs; a run of one goes out as a plain send.
"""

from __future__ import annotations

import socket
import struct
from typing import List, Sequence

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # <linux/udp.h>
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of the oldest kernels that have UDP_SEGMENT
MAX_BYTES = 65000  # one send's payload: under IPv4's 65,507
# A segment must fit the outgoing MTU (the kernel refuses the send otherwise): 1,452 bytes is
# what a 1,500-byte MTU leaves for UDP over IPv6 (1,472 over IPv4). Larger datagrams, which
# would be fragmented anyway, go one by one.
MAX_SEGMENT = 1452


def runs(datagrams: Sequence[bytes]) -> List[List[bytes]]:
    """datagrams, in order, cut into runs one UDP_SEGMENT send can carry (see the module). An
    empty datagram is always a run of its own: a segmented payload has no room for one."""
    out: List[List[bytes]] = []
    run: List[bytes] = []
    size = total = 0
    for data in datagrams:
        n = len(data)
        if run and not (0 < n <= size <= MAX_SEGMENT and len(run[-1]) == size
                        and len(run) < MAX_SEGMENTS and total + n <= MAX_BYTES):
            out.append(run)
            run = []
        if not run:
            size, total = n, 0
        run.append(data)
        total += n
    if run:
        out.append(run)
    return out


def segment_size(size: int) -> list:
    """The ancillary data of a UDP_SEGMENT sendmsg of segments of `size` bytes."""
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
