"""Socket options the relay needs that the socket module does not name, and pure parsers of the
kernel's answers (sockaddr structures), tested with synthetic bytes."""

from __future__ import annotations

import errno
import resource
import socket
import struct
from typing import Tuple

IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>, level SOL_IPV6
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # <linux/in.h>
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR = 20  # <linux/in.h>: a UDP datagram's original destination
IPV6_RECVORIGDSTADDR = IPV6_ORIGDSTADDR = 74  # <linux/in6.h>
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # cmsg: datagrams the kernel dropped so far
SOCKADDR_IN_LEN, SOCKADDR_IN6_LEN = 16, 28

Address = Tuple[str, int]


class SockaddrError(ValueError):
    """Bytes that are not the sockaddr the kernel should have returned."""


def parse_sockaddr(raw: bytes) -> Address:
    """(host, port) from a struct sockaddr_in or sockaddr_in6 as getsockopt returns it."""
    if len(raw) < 2:
        raise SockaddrError(f"sockaddr too short ({len(raw)} bytes)")
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET:
        if len(raw) < SOCKADDR_IN_LEN:
            raise SockaddrError(f"sockaddr_in needs {SOCKADDR_IN_LEN} bytes, got {len(raw)}")
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    if family == socket.AF_INET6:
        if len(raw) < SOCKADDR_IN6_LEN:
            raise SockaddrError(f"sockaddr_in6 needs {SOCKADDR_IN6_LEN} bytes, got {len(raw)}")
        port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    raise SockaddrError(f"unknown address family {family}")


# (level, type) of the control messages parse_udp_ancillary reads
_ORIGDST = {(socket.SOL_IP, IP_ORIGDSTADDR), (socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR)}
_OVFL = (socket.SOL_SOCKET, SO_RXQ_OVFL)
# Raw sockaddr -> its parse. Every datagram carries its destination's, and a session's repeat:
# a dict hit instead of unpack + inet_ntop takes parse_udp_ancillary from 0.48 to 0.12 us a
# datagram (timeit, one destination) and the relay's user CPU per echoed datagram from 4.0 to
# 3.2 us (python -m bench --only udp, 3 alternating pairs of 3 runs, 2026-12-02). Cleared when
# full: bounded whatever the destinations.
_DST_CACHE: dict[bytes, Address] = {}
DST_CACHE_SIZE = 4096


def parse_udp_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[Address | None, int | None]:
    """From recvmsg's ancillary data: the original destination (IP_ORIGDSTADDR or
    IPV6_ORIGDSTADDR) and the receive queue's drop count (SO_RXQ_OVFL: the kernel adds it
    only once a drop happened), each None if absent."""
    dst: Address | None = None
    dropped: int | None = None
    for level, kind, data in ancdata:
        if (level, kind) in _ORIGDST:
            dst = _DST_CACHE.get(data)
            if dst is None:
                dst = parse_sockaddr(data)
                if len(_DST_CACHE) >= DST_CACHE_SIZE:
                    _DST_CACHE.clear()
                _DST_CACHE[data] = dst
        elif (level, kind) == _OVFL and len(data) >= 4:
            (dropped,) = struct.unpack_from("=I", data)
    return dst, dropped


def _set_ip_option(sock: socket.SocketType, v4: int, v6: int) -> None:
    """Turn on the IPv4 or the IPv6 flavour of an option, by the socket's family."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, v6, 1)
    else:
        sock.setsockopt(socket.SOL_IP, v4, 1)


def set_recv_origdst(sock: socket.socket) -> None:
    """Ask recvmsg for each datagram's original destination, and for the drop counter."""
    _set_ip_option(sock, IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)


def original_dst_redirect(sock: socket.SocketType) -> Address:
    """The destination a REDIRECT rewrote, from conntrack (SO_ORIGINAL_DST)."""
    if sock.family == socket.AF_INET6:
        return parse_sockaddr(sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST,
                                              SOCKADDR_IN6_LEN))
    return parse_sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN))


def original_dst_tproxy(sock: socket.SocketType) -> Address:
    """TPROXY leaves the destination alone: the accepted socket's own address is it."""
    host, port = sock.getsockname()[:2]
    return host, port


def set_transparent(sock: socket.SocketType) -> None:
    """Allow binding to and accepting for addresses that are not this host's."""
    _set_ip_option(sock, IP_TRANSPARENT, IPV6_TRANSPARENT)


def set_reset_on_close(sock: socket.SocketType) -> None:
    """SO_LINGER {1, 0}: close() sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def is_local_address(host: str) -> bool:
    """Whether host is one of this namespace's own addresses (bind without IP_TRANSPARENT works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((host, 0))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return False
        raise
    finally:
        probe.close()
    return True


def raise_nofile(need: int) -> int:
    """Raise RLIMIT_NOFILE toward need (the hard limit too, when privileged); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need
