"""One direction of a relayed connection: bytes from src to dst.

A flow starts by copying: recv_into one buffer shared by the relay's flows, then send at once
(requests and answers of a few KiB never cost a pipe, its two descriptors or its syscalls).
When a read fills the buffer, the flow is a bulk transfer and moves to splice(2) through a pipe
of its own: the bytes no longer enter Python. Backpressure is structural: src is read only
while nothing is pending for dst; what a full dst did not take is kept (the only copy a flow
owns, made only then).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket

SPLICE = hasattr(os, "splice")  # Python >= 3.10 (the type: ignores below: Debian's mypy, 1.0,
# compiles this module with a typeshed that lacks os.splice)
SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2))
# 1 MiB pipes: +15% single-stream throughput over the default 64 KiB, at half the relay's CPU
# (bench, 2026-11-25). Pages are allocated only while data sits in the pipe.
PIPE_SIZE = 1 << 20
SMALL_PIPE = 1 << 16  # the kernel's default size: what a bulk flow gets when the budget is short
CHUNK = 1 << 16  # one copying read; a read this full makes the flow a splice flow
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
ROUNDS = 4  # reads per readiness event: bounds one fast flow's share of a loop iteration
_UNSPLICEABLE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
SRC, DST = "src", "dst"  # which socket of a flow failed (Flow.failed)



class Pool:
    """What one relay's flows share. The relay is one thread: one buffer serves every copying
    read, because each read is written out (or its remainder saved) before the next happens.
    And a budget for pipes: their pages are outside the kernel's TCP memory accounting and
    cannot be reclaimed while a reader stalls, so their capacity, all flows together, stays
    within max_pipe_memory."""

    def __init__(self, max_pipe_memory: int = 256 << 20) -> None:
        self.buffer = memoryview(bytearray(CHUNK))
        self.max_pipe_memory = max_pipe_memory
        self.pipe_memory = 0  # capacity of the pipes open now
        self.pipes_small = 0  # bulk flows given SMALL_PIPE because the budget was short
        self.pipes_refused = 0  # bulk flows left copying because the budget was spent

    def grant(self) -> int:
        """The pipe size a new bulk flow may have: PIPE_SIZE, SMALL_PIPE, or 0 (copy)."""
        free = self.max_pipe_memory - self.pipe_memory
        if free >= PIPE_SIZE:
            return PIPE_SIZE
        if free >= SMALL_PIPE:
            self.pipes_small += 1
            return SMALL_PIPE
        self.pipes_refused += 1
        return 0


class Flow:
    """Moves bytes src -> dst. `pending` bytes were read and not yet written; `eof` once src
    sent FIN; `shut` once that FIN was passed on (shutdown(SHUT_WR) on dst, or, for the
    connection's last FIN, left to close())."""

    __slots__ = ("buffer", "bytes", "can_splice", "dst", "eof", "failed", "leftover", "pending",
                 "pipe", "pipe_size", "pool", "shut", "src")

    def __init__(self, src: socket.SocketType, dst: socket.SocketType, use_splice: bool = SPLICE,
                 pool: Pool | None = None):
        self.src, self.dst = src, dst
        self.pool = pool or Pool()
        self.buffer = self.pool.buffer
        self.pipe: tuple[int, int] | None = None  # only for bulk flows
        self.pipe_size = 0  # its capacity, counted in pool.pipe_memory
        self.leftover: memoryview | None = None  # copy mode: what dst did not take yet
        self.pending = 0
        self.eof = False
        self.shut = False
        self.bytes = 0
        self.can_splice = use_splice
        self.failed: str | None = None  # SRC or DST: whose error an OSError raised here was

    @property
    def finished(self) -> bool:
        """src sent FIN and everything before it reached dst."""
        return self.eof and not self.pending

    def pump(self) -> int:
        """Move what can move now; returns the bytes written to dst. Raises OSError (other than
        "would block") when either socket fails: the caller ends the connection."""
        moved = 0
        for _ in range(ROUNDS):
            if self.pending:
                moved += self._write_pending()
                if self.pending:
                    break  # dst is full: wait for it to drain
            if self.eof:
                break
            # decided before the read: a copy that fills the buffer opens the pipe itself, and
            # what it sent already must be counted as a copy's
            spliced = self.pipe is not None
            n = self._splice_in() if spliced else self._copy()
            if n is None:
                break  # src has nothing now
            if n == 0:
                self.eof = True
                break
            if spliced:  # in the pipe: out at once
                moved += self._write_pending()
            else:  # copied: written already, the rest (if any) pending
                moved += n - self.pending
                if n < CHUNK:
                    break  # a short read drained src: skip the read that would say EAGAIN
            if self.pending:
                break
        self.bytes += moved
        return moved

    def read_ahead(self) -> int:
        """Before dst is connected: read what src sent already into the shared buffer, for
        send_ahead(), which must come before anything else reads. Returns the bytes read; 0 if
        none yet, or at EOF (then `eof` is set). Raises OSError when src failed."""
        try:
            n = self.src.recv_into(self.buffer)
        except BlockingIOError:
            return 0
        except OSError:
            self.failed = SRC
            raise
        if n == 0:
            self.eof = True
        return n

    def send_ahead(self, n: int) -> int:
        """Send the n bytes read_ahead() left in the shared buffer; what dst does not take (all
        of it while dst still connects) is kept. Returns the bytes sent."""
        self._send_shared(n)
        sent = n - self.pending
        self.bytes += sent
        return sent

    def flush(self) -> int:
        """Write what is pending, without reading src; returns the bytes written."""
        sent = self._write_pending() if self.pending else 0
        self.bytes += sent
        return sent

    def pass_fin(self) -> None:
        """Carry src's FIN to dst once everything before it is written."""
        if self.finished and not self.shut:
            self.shut = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                self.failed = DST
                raise

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
            self.pool.pipe_memory -= self.pipe_size
            self.pipe_size = 0
        self.leftover = None

    # --- copying -------------------------------------------------------------------------------

    def _copy(self) -> int | None:
        """One read into the shared buffer, written out at once; what dst does not take is
        kept as leftover (pending). Returns the bytes read, 0 at EOF, None if nothing now."""
        try:
            n = self.src.recv_into(self.buffer)
        except BlockingIOError:
            return None
        except OSError:
            self.failed = SRC
            raise
        if n == 0:
            return 0
        if n == CHUNK and self.can_splice:
            self._start_splicing()  # a bulk transfer: the next reads splice
        self._send_shared(n)
        return n

    def _send_shared(self, n: int) -> None:
        """Write the shared buffer's first n bytes to dst; keep a copy of what it did not take."""
        try:
            sent = self.dst.send(self.buffer[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.failed = DST
            raise
        if sent < n:
            self.leftover = memoryview(bytes(self.buffer[sent:n]))
            self.pending = n - sent

    def _write_pending(self) -> int:
        if self.leftover is not None:
            try:
                sent = self.dst.send(self.leftover)
            except BlockingIOError:
                return 0
            except OSError:
                self.failed = DST
                raise
            self.pending -= sent
            self.leftover = self.leftover[sent:] if self.pending else None
            return sent
        assert self.pipe is not None
        try:
            sent = os.splice(self.pipe[0], self.dst.fileno(), self.pending, flags=SPLICE_FLAGS)  # type: ignore[attr-defined]
        except BlockingIOError:
            return 0
        except OSError:
            self.failed = DST
            raise
        self.pending -= sent
        return sent

    # --- splicing ------------------------------------------------------------------------------

    def _start_splicing(self) -> None:
        size = self.pool.grant()
        if not size:  # the relay's pipe budget is spent: this flow keeps copying
            self.can_splice = False
            return
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of descriptors: this flow keeps copying
            self.can_splice = False
            return
        if size > SMALL_PIPE:
            with contextlib.suppress(OSError):  # EPERM past fs.pipe-max-size: keep 64 KiB
                fcntl.fcntl(pipe[1], F_SETPIPE_SZ, size)
        self.pipe = pipe
        # what the kernel gave (less than asked past pipe-user-pages-soft), never more
        self.pipe_size = fcntl.fcntl(pipe[1], F_GETPIPE_SZ)
        self.pool.pipe_memory += self.pipe_size

    def _splice_in(self) -> int | None:
        """Bytes moved from src into the pipe (now pending); 0 at EOF; None if nothing now."""
        assert self.pipe is not None
        try:
            n = os.splice(self.src.fileno(), self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)  # type: ignore[attr-defined]
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in _UNSPLICEABLE:
                self.failed = SRC
                raise
            self.can_splice = False  # a socket the kernel cannot splice: copy from now on;
            self.close()  # the pipe is empty (nothing pending), and src is still readable
            return None
        self.pending = n
        return n
