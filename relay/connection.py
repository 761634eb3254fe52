"""One relayed TCP connection and its explicit states.

    CONNECTING --connected--> RELAYING --client FIN passed on--> CLIENT_DONE --+
                                  |                                           +--> CLOSED
                                  +------server FIN passed on--> SERVER_DONE --+
    any state --error, reset, timeout--> CLOSED (reset both ways)
"""

from __future__ import annotations

import contextlib
import enum
import os
import selectors
import socket

from .flow import Flow
from .sockopts import Address, set_reset_on_close

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
CLIENT, SERVER = 0, 1


class State(enum.Enum):
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLIENT_DONE = "client done sending"  # half-closed: server -> client still flows
    SERVER_DONE = "server done sending"  # half-closed: client -> server still flows
    CLOSED = "closed"


class ConnectFailed(OSError):
    """The server refused, was unreachable, or did not answer in time."""


class Connection:
    __slots__ = ("client", "client_addr", "deadline", "down", "dst", "last_active", "masks",
                 "server", "state", "timer_at", "up")

    def __init__(self, client: socket.SocketType, client_addr: Address, server: socket.SocketType,
                 dst: Address, now: float, use_splice: bool):
        self.client, self.server = client, server
        self.client_addr, self.dst = client_addr, dst
        self.up = Flow(client, server, use_splice)  # client -> server
        self.down = Flow(server, client, use_splice)  # server -> client
        self.state = State.CONNECTING
        self.last_active = now
        self.deadline = 0.0  # connect deadline while CONNECTING
        self.timer_at = 0.0  # when this connection's live timer fires (see Relay._schedule)
        self.masks = [0, 0]  # what the selector watches now, per side

    def wanted_masks(self) -> tuple[int, int]:
        """The events each socket should be watched for, computed from the state alone."""
        if self.state is State.CONNECTING:
            return 0, WRITE
        if self.state is State.CLOSED:
            return 0, 0
        client = (READ if self.up.wants_read else 0) | (WRITE if self.down.wants_write else 0)
        server = (READ if self.down.wants_read else 0) | (WRITE if self.up.wants_write else 0)
        return client, server

    def connected(self) -> None:
        """The server socket became writable while CONNECTING: did the connect succeed?"""
        err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectFailed(err, f"connect to {self.dst[0]} port {self.dst[1]}: "
                                     f"{os.strerror(err)}")
        self.state = State.RELAYING

    def on_event(self, side: int, mask: int, now: float) -> None:
        """Move the bytes this readiness allows, then pass on FINs and advance the state.
        Raises OSError when a socket fails; the caller resets the connection."""
        if self.state is State.CONNECTING:
            self.connected()
            pump_up = pump_down = True  # the client may have sent data while we connected
        elif side == CLIENT:
            pump_up, pump_down = bool(mask & READ), bool(mask & WRITE)
        else:
            pump_up, pump_down = bool(mask & WRITE), bool(mask & READ)
        moved = (self.up.pump() if pump_up else 0) + (self.down.pump() if pump_down else 0)
        if moved:
            self.last_active = now
        self.up.pass_fin()
        self.down.pass_fin()
        if self.up.shut and self.down.shut:
            self.state = State.CLOSED
        elif self.up.shut:
            self.state = State.CLIENT_DONE
        elif self.down.shut:
            self.state = State.SERVER_DONE

    def close(self, reset: bool) -> None:
        """Release both sockets and pipes. Runs once (later calls do nothing), never raises.
        reset: each peer sees RST (SO_LINGER 0) instead of FIN."""
        self.state = State.CLOSED
        for sock in (self.client, self.server):
            if sock.fileno() < 0:
                continue
            if reset:
                with contextlib.suppress(OSError):
                    set_reset_on_close(sock)
            sock.close()
        self.up.close()
        self.down.close()
