"""The relay's listening sockets. Made here by a relay running alone, or by the daemon, which
keeps them across reloads and hands them to its workers (no connection waits in the queue of a
socket that is being closed), one set per worker with SO_REUSEPORT."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .sockopts import set_recv_origdst, set_transparent


def open_listeners(port: int, hosts: Sequence[str], transparent: bool, udp: bool,
                   reuseport: bool = False) -> list[socket.socket]:
    """TCP (and UDP) sockets bound to port on each host, non-blocking, close-on-exec."""
    made: list[socket.socket] = []
    try:
        kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
        for kind in kinds:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(family, kind)
                made.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuseport:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if transparent or kind == socket.SOCK_DGRAM:  # UDP capture is TPROXY only
                    set_transparent(s)
                if kind == socket.SOCK_DGRAM:
                    set_recv_origdst(s)
                s.bind((host, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(4096)
                s.setblocking(False)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made
