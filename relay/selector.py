"""The relay's selector: the stdlib's epoll selector, forget() for a socket closed next, and
poll() for the compiled loop.

close() takes a socket out of epoll's interest list by itself once its last descriptor is
closed, and a relayed connection's sockets have one descriptor each (the relay never dups
them, and a worker never forks). So a connection that ends needs no EPOLL_CTL_DEL for the
sockets it still watches: forget() drops the selector's own record and the close does the
rest. One syscall and one stdlib unregister() less per connection: the relay's user CPU per
connection 30.6 -> 28.8 us, conn/s x1.020 (python -m bench.profile --compare, medians of 9,
2026-12-02).
"""

from __future__ import annotations

import math
import select
import selectors
import socket
from selectors import EVENT_READ, EVENT_WRITE, SelectorKey
from typing import Any

# selectors' events as epoll's; a key missing is an invalid events value (ValueError below)
_EPOLL = {EVENT_READ: select.EPOLLIN, EVENT_WRITE: select.EPOLLOUT,
          EVENT_READ | EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT}


def _epoll_timeout(timeout: float | None) -> float:
    """select()'s timeout as the stdlib's EpollSelector hands it to epoll: -1 to block, rounded
    up to the millisecond (epoll's unit) so a timer is never woken for early."""
    if timeout is None:
        return -1
    if timeout <= 0:
        return 0
    return math.ceil(timeout * 1e3) * 1e-3


class Selector(selectors.EpollSelector):
    """register() and modify() as the stdlib's, for sockets, in one Python call each: the
    stdlib's go through three layers of calls and a fileobj lookup for each. conn/s x1.010
    (12 runs 0.999-1.016), relay CPU a connection x0.988 (`python -m bench.profile --compare
    OLD NEW --side-by-side --repeat 12`, 2026-12-03)."""

    def register(self, fileobj: Any, events: int, data: Any = None) -> SelectorKey:
        fd = fileobj.fileno()
        if events not in _EPOLL:
            raise ValueError(f"Invalid events: {events!r}")
        keys = self._fd_to_key  # type: ignore[attr-defined]
        if fd in keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._selector.register(fd, _EPOLL[events])  # type: ignore[attr-defined]
        key = keys[fd] = SelectorKey(fileobj, fd, events, data)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> SelectorKey:
        fd = fileobj.fileno()
        keys = self._fd_to_key  # type: ignore[attr-defined]
        key = keys.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != key.events:
            if events not in _EPOLL:
                raise ValueError(f"Invalid events: {events!r}")
            self._selector.modify(fd, _EPOLL[events])  # type: ignore[attr-defined]
        elif data == key.data:
            return key
        key = keys[fd] = SelectorKey(fileobj, fd, events, data)
        return key

    def __init__(self) -> None:
        super().__init__()
        # the loop's view of what is registered: fd -> SelectorKey, the stdlib's own dict
        self.keys: dict[int, SelectorKey] = self._fd_to_key  # type: ignore[attr-defined]

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        """What epoll reports, as (fd, epoll events), for the relay's compiled loop, which
        looks each fd up in self.keys: select() does that per event in Python (a method call
        and a tuple each). [] when a signal interrupted the wait, as select(). conn/s x1.006
        (10 runs 1.000-1.012), relay CPU a connection x0.996 (`python -m bench.profile
        --compare OLD NEW --side-by-side --repeat 10`, 2026-12-03, compiled relay)."""
        try:
            return self._selector.poll(_epoll_timeout(timeout), max(len(self.keys), 1))  # type: ignore[attr-defined]
        except InterruptedError:
            return []

    def forget(self, sock: socket.SocketType) -> None:
        """Stop reporting sock, whose close() follows at once (see the module's docstring).
        Never raises: a socket not registered is left as it is."""
        self._fd_to_key.pop(sock.fileno(), None)  # type: ignore[attr-defined]
