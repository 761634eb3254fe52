"""Netlink notifications as a drift signal: any rule, route or nftables change makes a
(debounced) reconcile, which reads the state and does nothing if ours is intact."""

from __future__ import annotations

import contextlib
import logging
import socket

log = logging.getLogger("tproxyd")

# rtnetlink groups: IPv4 routes, IPv4 rules, IPv6 routes; IPv6 rules is group 19
RTNL_GROUPS = 0x40 | 0x80 | 0x400 | (1 << (19 - 1))
NETLINK_NETFILTER, NFNLGRP_NFTABLES = 12, 7


def subscribe() -> list[socket.socket]:
    """Non-blocking sockets that become readable when rules, routes or nftables change."""
    sockets = []
    for proto, groups in ((socket.NETLINK_ROUTE, RTNL_GROUPS),
                          (NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))):
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
        except OSError as exc:
            log.warning("no netlink notifications (%s): drift is found by the periodic "
                        "resync only", exc)
            continue
        try:
            s.bind((0, groups))
            s.setblocking(False)
        except OSError as exc:
            s.close()
            log.warning("no netlink notifications (%s): drift is found by the periodic "
                        "resync only", exc)
            continue
        sockets.append(s)
    return sockets


def drain(sock: socket.socket) -> None:
    """Read and forget: any message means "look again". ENOBUFS (the kernel dropped
    notifications we were too slow for) means the same."""
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
