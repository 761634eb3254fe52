"""The daemon's status socket (mode 0600, `[daemon] socket`): `tproxy status` connects and reads
one JSON document.

A reader may name what it wants in a first line: "status\n" (the default) or "top\n" (the open
connections, for `tproxy top`). A reader that says nothing within FRESH_WAIT gets the status, as
readers before request kinds did; one that names a kind is answered as soon as its kind's data
is fresh, so a request on its way never meets a status answer.

Answering never blocks the daemon's loop: the document is built from what the daemon already
holds (its last reconcile, its workers, their last counters). A request asks the workers for
fresh counters (worker_stats.py) and is answered when they have all replied or after
FRESH_WAIT, whichever comes first; the reply is written as the reader takes it, and a reader
that takes nothing for SEND_TIMEOUT is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass

from tproxyd.relay import unixsock

FRESH_WAIT = 0.25  # seconds a reader waits for the workers' fresh counters at most
STATUS, TOP = "status", "top"
MAX_REQUEST = 64
SEND_TIMEOUT = 2.0
MAX_READERS = 64  # waiting or being written to; past it, new readers are closed at once


@dataclass
class _Reader:
    sock: socket.socket
    since: float
    out: bytes = b""
    sending: bool = False
    kind: str | None = None  # None: no request line read (yet)
    request: bytes = b""


@dataclass
class Kind:
    """One kind of request: the answer, how to refresh its data, whether it is fresh."""

    document: Callable[[], dict]
    refresh: Callable[[], None]
    fresh: Callable[[], bool]


class StatusServer:
    def __init__(self, path: str, selector: selectors.BaseSelector, clock: Callable[[], float],
                 document: Callable[[], dict], refresh: Callable[[], None],
                 fresh: Callable[[], bool], top: Kind | None = None):
        """document builds the answer; refresh asks the workers for new counters; fresh says
        whether they have all answered since. top: the "top" request, when served."""
        self.path = path
        self.selector = selector
        self.clock = clock
        self.document, self.refresh, self.fresh = document, refresh, fresh
        self.kinds = {STATUS: Kind(document, refresh, fresh)}
        if top is not None:
            self.kinds[TOP] = top
        self.listener: socket.socket | None = None
        self.readers: list[_Reader] = []

    def open(self) -> None:
        self.listener = unixsock.listen(self.path)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        assert self.listener is not None
        new = False
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                break
            except OSError:  # out of descriptors, for one: the next readiness tries again
                break
            if len(self.readers) >= MAX_READERS:
                sock.close()
                continue
            sock.setblocking(False)
            r = _Reader(sock, self.clock())
            self.readers.append(r)
            self.selector.register(sock, selectors.EVENT_READ, lambda r=r: self._read_request(r))
            new = True
        if new:
            self.refresh()  # most readers want the status: ask the workers now

    def _read_request(self, r: _Reader) -> None:
        """A first line names the kind; EOF or a line of no known kind means status."""
        try:
            chunk = r.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        r.request += chunk
        if chunk and b"\n" not in r.request and len(r.request) < MAX_REQUEST:
            return
        word = r.request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        r.kind = word if word in self.kinds else STATUS
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(r.sock)
        if r.kind != STATUS:
            r.since = self.clock()
            self.kinds[r.kind].refresh()

    def tick(self) -> float | None:
        """Answer the readers whose wait is over; drop the slow ones. The next deadline."""
        now = self.clock()
        for name, kind in self.kinds.items():
            # a reader that named no kind yet is answered the status after FRESH_WAIT
            waiting = [r for r in self.readers if not r.sending and (
                r.kind == name or (r.kind is None and name == STATUS
                                   and r.since + FRESH_WAIT <= now))]
            if not waiting or not (kind.fresh() or min(r.since for r in waiting)
                                   + FRESH_WAIT <= now):
                continue
            data = json.dumps(kind.document()).encode() + b"\n"
            for r in waiting:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(r.sock)
                r.out, r.sending, r.since = data, True, now
                self._write(r)
        for r in list(self.readers):
            if r.sending and now - r.since >= SEND_TIMEOUT:
                self._drop(r)
        deadlines = [r.since + (SEND_TIMEOUT if r.sending else FRESH_WAIT) for r in self.readers]
        return min(deadlines, default=None)

    def _write(self, r: _Reader) -> None:
        try:
            sent = r.sock.send(r.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(r)
            return
        r.out = r.out[sent:]
        if not r.out:
            self._drop(r)
            return
        try:
            self.selector.get_key(r.sock)
        except KeyError:  # the rest goes when the reader has taken some
            self.selector.register(r.sock, selectors.EVENT_WRITE, lambda: self._write(r))

    def _drop(self, r: _Reader) -> None:
        if r in self.readers:
            self.readers.remove(r)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(r.sock)
        r.sock.close()

    def close(self) -> None:
        for r in list(self.readers):
            self._drop(r)
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
