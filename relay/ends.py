"""How a relayed TCP connection or UDP session ended. The values are the access log's `end`
names (issue 14) and the suffixes of the relay's per-end counters (end_tcp_<value>,
end_udp_<value>), so a log line, a counter and a metric label say the same thing."""

from __future__ import annotations

import enum
import errno


class End(enum.Enum):
    CLIENT_FIN = "client_fin"  # the client finished sending first; both sides then closed
    SERVER_FIN = "server_fin"  # the server did
    CLIENT_RESET = "client_reset"  # the client's socket failed or was reset (also before connect)
    SERVER_RESET = "server_reset"  # the server's socket failed or was reset (also accept-then-reset)
    IDLE_TIMEOUT = "idle_timeout"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_REFUSED = "connect_refused"
    UNREACHABLE = "unreachable"  # no route, host or network unreachable
    UPSTREAM_ERROR = "upstream_error"  # any other failure to reach the destination; every
    # upstream of the route failed (or none is up), or closed a UDP association
    REJECTED = "rejected"  # a route said reject: TCP reset at accept, a UDP datagram dropped
    OVER_LIMIT = "over_limit"  # max_connections, per-client limits, out of descriptors
    LOOP = "loop"  # the original destination was the relay itself
    DRAINED = "drained"  # cut by a stop while still carrying data
    UDP_EXPIRED = "udp_expired"
    UDP_EVICTED = "udp_evicted"  # over max_udp_sessions, least recently used first
    UDP_ICMP = "udp_icmp"  # the server side answered with an ICMP error


# a connect's errno -> its end; anything else is UPSTREAM_ERROR
CONNECT_ERRORS = {
    errno.ECONNREFUSED: End.CONNECT_REFUSED,
    errno.ENETUNREACH: End.UNREACHABLE,
    errno.EHOSTUNREACH: End.UNREACHABLE,
    errno.ENETDOWN: End.UNREACHABLE,
    errno.EHOSTDOWN: End.UNREACHABLE,
    errno.ETIMEDOUT: End.CONNECT_TIMEOUT,  # the kernel's SYN retries ran out first
    errno.ECONNRESET: End.SERVER_RESET,  # accepted, then reset before the first bytes went
    errno.EPIPE: End.SERVER_RESET,
}
# out of a local resource: the relay's limit, not the destination's fault
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def connect_end(err: int | None) -> End:
    return CONNECT_ERRORS.get(err or 0, End.UPSTREAM_ERROR)


class ConnectFailed(OSError):
    """The server refused, was unreachable, or did not answer in time. (Here rather than in
    connection.py, which is compiled: mypyc cannot compile a subclass of OSError.)"""
