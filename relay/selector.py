"""The relay's selector: the stdlib's epoll selector, and forget() for a socket closed next.

close() takes a socket out of epoll's interest list by itself once its last descriptor is
closed, and a relayed connection's sockets have one descriptor each (the relay never dups
them, and a worker never forks). So a connection that ends needs no EPOLL_CTL_DEL for the
sockets it still watches: forget() drops the selector's own record and the close does the
rest. One syscall and one stdlib unregister() less per connection: the relay's user CPU per
connection 30.6 -> 28.8 us, conn/s x1.020 (python -m bench.profile --compare, medians of 9,
2026-12-02).
"""

from __future__ import annotations

import select
import selectors
import socket
from selectors import EVENT_READ, EVENT_WRITE, SelectorKey
from typing import Any

# selectors' events as epoll's; a key missing is an invalid events value (ValueError below)
_EPOLL = {EVENT_READ: select.EPOLLIN, EVENT_WRITE: select.EPOLLOUT,
          EVENT_READ | EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT}


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

    def forget(self, sock: socket.SocketType) -> None:
        """Stop reporting sock, whose close() follows at once (see the module's docstring).
        Never raises: a socket not registered is left as it is."""
        self._fd_to_key.pop(sock.fileno(), None)  # type: ignore[attr-defined]
