"""The workers' counters, asked for without blocking the daemon's loop.

Each worker answers one JSON document per connection on its stats socket. A worker that is
busy, stopped or stuck must not hold up reconciles or status: connects are non-blocking, the
sockets sit in the daemon's selector, and an answer is read as it arrives. A worker that has
not answered within STATS_TIMEOUT is asked again in a later round; its last report stands.
As it exits, a worker writes its final counters to a pipe (--report-fd), read the same way:
what it counted after the last round still reaches the totals.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .supervisor import Worker

STATS_TIMEOUT = 2.0  # seconds an asked worker has to answer
MAX_REPORT = 1 << 20  # a report larger than this is not a worker's


@dataclass
class _Request:
    worker: Worker
    sock: socket.socket
    started: float
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class StatsPoller:
    def __init__(self, selector: selectors.BaseSelector, clock: Callable[[], float],
                 on_report: Callable[[Worker, dict, float], None],
                 make_socket: Callable[[], socket.socket] = lambda: socket.socket(
                     socket.AF_UNIX, socket.SOCK_STREAM)):
        """make_socket: the socket to ask with; one bound to a listing address asks a worker
        for its connection list instead of its counters (relay/listing.py)."""
        self.make_socket = make_socket
        self.selector = selector
        self.clock = clock
        self.on_report = on_report
        self.requests: dict[int, _Request] = {}  # by worker pid
        self.exits: list[io.FileIO] = []  # pipes of final reports still to come

    @property
    def idle(self) -> bool:
        """Every worker asked so far has answered or timed out."""
        return not self.requests

    def ask(self, workers: Iterable[Worker], again: bool = False) -> None:
        """Ask each worker for its counters. again: replace a question still unanswered, so
        the answer is at least as new as this call (status wants that; a periodic round
        leaves a pending question alone)."""
        for w in workers:
            pid = w.proc.pid
            if pid in self.requests:
                if not again:
                    continue
                self._end(self.requests[pid])
            try:
                sock = self.make_socket()
            except OSError:  # out of descriptors: next round
                continue
            sock.setblocking(False)
            try:
                sock.connect(w.stats)  # a Unix socket connects at once or fails (EAGAIN: full)
            except OSError:  # not listening yet, gone, or its backlog is full: next round
                sock.close()
                continue
            req = _Request(w, sock, self.clock())
            self.requests[pid] = req
            self.selector.register(sock, selectors.EVENT_READ, lambda r=req: self._on_readable(r))

    def expire(self) -> float | None:
        """Give up on workers that did not answer in time; the next deadline, if any."""
        now = self.clock()
        for req in list(self.requests.values()):
            if now - req.started >= STATS_TIMEOUT:
                self._end(req)
        return min((r.started + STATS_TIMEOUT for r in self.requests.values()), default=None)

    def watch_exit(self, w: Worker) -> None:
        """Read w's final report from its pipe when it comes (at EOF: the worker is gone)."""
        fd, w.report_fd = w.report_fd, None
        if fd is None:
            return
        os.set_blocking(fd, False)
        pipe = os.fdopen(fd, "rb", buffering=0)
        chunks: list[bytes] = []

        def on_readable() -> None:
            try:
                chunk = pipe.read(65536)
            except OSError:
                chunk = b""
            if chunk is None:  # nothing yet (EAGAIN)
                return
            if chunk and sum(map(len, chunks)) + len(chunk) <= MAX_REPORT:
                chunks.append(chunk)
                return
            self.exits.remove(pipe)
            self.selector.unregister(pipe)
            pipe.close()
            with contextlib.suppress(ValueError):  # killed before it could report: nothing
                report = json.loads(b"".join(chunks))
                if isinstance(report, dict):
                    self.on_report(w, report, self.clock())

        self.exits.append(pipe)
        self.selector.register(pipe, selectors.EVENT_READ, on_readable)

    def close(self) -> None:
        for req in list(self.requests.values()):
            self._end(req)
        for pipe in self.exits:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(pipe)
            pipe.close()
        self.exits.clear()

    def _on_readable(self, req: _Request) -> None:
        try:
            while chunk := req.sock.recv(65536):
                req.chunks.append(chunk)
                req.size += len(chunk)
                if req.size > MAX_REPORT:
                    raise ValueError("report too large")
        except BlockingIOError:
            return  # the rest comes later
        except (OSError, ValueError):
            self._end(req)
            return
        with contextlib.suppress(ValueError):  # half a document: its last report stands
            report = json.loads(b"".join(req.chunks))
            if isinstance(report, dict):
                self.on_report(req.worker, report, self.clock())
        self._end(req)

    def _end(self, req: _Request) -> None:
        if self.requests.get(req.worker.proc.pid) is req:
            del self.requests[req.worker.proc.pid]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(req.sock)
        req.sock.close()
