"""The access log (issue 14): one JSON line per ended TCP connection and per ended UDP session.

`line()` is a pure formatter of an ended connection's facts. It is a format string, not
json.dumps of a dict: 1.2 us a line against 2.4 us (bench/accesslog.py --formatter), and the
only free-text fields (domain, route, via, error) go through json.dumps, cached per value.

`AccessLog` keeps the lines of one loop turn and writes them with one os.write of whole lines
on a descriptor opened O_APPEND (flush(), at the end of each turn), so lines of several workers
never interleave and none waits for a later turn. A write that fails (ENOSPC, EIO, EAGAIN on a
full pipe) drops its lines and counts them: the relay never waits on its log. A file renamed
away by logrotate is noticed by comparing the path's inode with the open one's, at most once a
second.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import time
from typing import Any, Callable

log = logging.getLogger("tproxyd.relay")

OFF, STDERR = "off", "stderr"
REOPEN_CHECK = 1.0  # seconds between checks that the path still names the open file
FILE_MODE = 0o640

_LINE = ('{"ts":"%s","proto":"%s","client":"%s","dst":"%s",%s"route":%s,"via":%s,'
         '"bytes_up":%d,"bytes_down":%d,"duration_ms":%d,"connect_ms":%s,"end":"%s"%s}\n')
_quoted: dict[str, str] = {}
_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _q(text: str) -> str:
    """text as a JSON string; route and upstream names repeat, so each is encoded once."""
    out = _quoted.get(text)
    if out is None:
        out = json.dumps(text)
        if len(_quoted) < 4096:  # names from the config; a sniffed domain is not kept forever
            _quoted[text] = out
    return out


def rfc3339(t: float) -> str:
    """UTC, milliseconds: 2026-12-02T13:55:54.123Z. The seconds part is cached."""
    sec = int(t)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


def hostport(addr: tuple) -> str:
    """'addr:port', IPv6 in brackets."""
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def line(ts: float, proto: str, client: tuple, dst: tuple, route: str, via: str, bytes_up: int,
         bytes_down: int, duration: float, connect: float | None, end: str,
         domain: str | None = None, error: str | None = None) -> bytes:
    """One access-log line. ts: wall-clock end time; duration and connect in seconds (connect
    None: no handshake was done, or none applies, as in UDP)."""
    return (_LINE % (
        rfc3339(ts), proto, hostport(client), hostport(dst),
        f'"domain":{_q(domain)},' if domain else "", _q(route), _q(via), bytes_up, bytes_down,
        duration * 1000, "null" if connect is None else str(int(connect * 1000)), end,
        f',"error":{_q(error)}' if error else "")).encode()


def tcp_line(conn: Any, end: str, now: float, ts: float) -> bytes:
    """The line of an ended relay Connection (now: the loop's monotonic clock). Route, via,
    domain and error are read with defaults: routing adds them to the connection."""
    connected = conn.connected_at
    return line(ts, "tcp", conn.client_addr, conn.dst, getattr(conn, "route_name", "direct"),
                getattr(conn, "via", "direct"), conn.up.bytes, conn.down.bytes,
                now - conn.started, None if connected is None else connected - conn.started,
                end, getattr(conn, "domain", None),
                (getattr(conn, "error", None) or None) if end == "upstream_error" else None)


def udp_line(session: Any, end: str, now: float, ts: float) -> bytes:
    return line(ts, "udp", session.client, session.dst, getattr(session, "route_name", "direct"),
                getattr(session, "via", "direct"), session.bytes_up, session.bytes_down,
                now - session.started, None, end, getattr(session, "domain", None))


class AccessLog:
    """Where lines go: stderr, or a file reopened when rotated. Never raises on a write."""

    def __init__(self, target: str, on_drop: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.target = target
        self.on_drop = on_drop
        self.clock = clock
        self.fd = -1
        self.send: Callable[[bytes], int] | None = None  # stderr when it is a socket (journal)
        self.sock: socket.socket | None = None
        self.checked = -1e9
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self.failing: str | None = None  # the last error opening the file
        self.pending: list[bytes] = []  # this loop turn's lines
        if target == STDERR:
            self._open_stderr()
        else:
            self._open_file()

    def _open_stderr(self) -> None:
        """A non-blocking way to write stderr without making fd 2 itself non-blocking (its
        file description is shared with the daemon and the logging module): a pipe is opened
        again through /proc; a socket (the journal's) gets MSG_DONTWAIT per send."""
        try:
            mode = os.fstat(2).st_mode
        except OSError:
            return
        if stat.S_ISSOCK(mode):
            sock = self.sock = socket.socket(fileno=os.dup(2))
            self.send = lambda data: sock.send(data, socket.MSG_DONTWAIT)
            return
        if stat.S_ISFIFO(mode):
            with contextlib.suppress(OSError):
                self.fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                return
        self.fd = os.dup(2)  # a file or a terminal: a write does not wait on a reader

    def _open_file(self) -> None:
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         FILE_MODE)
        except OSError as exc:
            if str(exc) != self.failing:  # tried once a second: said once, not each time
                self.failing = str(exc)
                log.error("access log %s: %s; lines are dropped until it can be opened",
                          self.target, exc.strerror)
            return
        if self.failing is not None:
            self.failing = None
            log.info("access log %s: open again", self.target)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)

    def _rotated(self) -> bool:
        """Whether the path names another file than the open one (or none, or none is open)."""
        try:
            st = os.stat(self.target)
        except OSError:
            return True
        return self.identity != (st.st_dev, st.st_ino)

    def write(self, data: bytes) -> None:
        """Keep one whole line for this turn's flush()."""
        self.pending.append(data)

    def flush(self) -> None:
        """Write this turn's lines, or drop and count them. One write a turn, not one a line
        (about 31 lines a turn at 64 connections at once): conn/s x1.010 with the log to a file
        (12 runs 1.004-1.021), relay CPU a connection x0.987 (`python -m bench.profile
        --compare OLD NEW --side-by-side --access-log --repeat 12`, 2026-12-03). A file opened
        O_APPEND takes a whole write at once whatever its size; stderr (a pipe or the journal's
        socket, shared with other workers) only up to PIPE_BUF, so its writes are cut there,
        between lines."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        if self.send is None and self.target != STDERR:
            now = self.clock()
            if now - self.checked >= REOPEN_CHECK:
                self.checked = now
                if self.fd < 0 or self._rotated():
                    self._open_file()
        if len(pending) == 1:
            self._write(pending[0], 1)
        elif self.target != STDERR:
            self._write(b"".join(pending), len(pending))
        else:
            for data, lines in batches(pending, select.PIPE_BUF):
                self._write(data, lines)

    def _write(self, data: bytes, lines: int) -> None:
        """One write of `lines` whole lines; those not written whole are dropped and counted."""
        try:
            if self.send is not None:
                written = self.send(data)
            elif self.fd >= 0:
                written = os.write(self.fd, data)
            else:
                written = 0
        except OSError as exc:
            written = 0
            if exc.errno not in (errno.EAGAIN, errno.ENOSPC, errno.EIO, errno.EPIPE,
                                 errno.EDQUOT, errno.EFBIG):
                log.debug("access log write: %s", exc)
        if written != len(data):  # a line cut short (the disk filled mid-write) is lost
            for _ in range(lines - data.count(b"\n", 0, max(written, 0))):
                self.on_drop()

    def close(self) -> None:
        """Writes what is pending, then closes. Runs once, never raises."""
        self.flush()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.send = None


def batches(lines: list[bytes], limit: int) -> list[tuple[bytes, int]]:
    """Whole lines joined into writes of at most `limit` bytes (a longer line goes alone), each
    with its number of lines."""
    out: list[tuple[bytes, int]] = []
    batch: list[bytes] = []
    size = 0
    for line in lines:
        if batch and size + len(line) > limit:
            out.append((b"".join(batch), len(batch)))
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        out.append((b"".join(batch), len(batch)))
    return out


def open_log(target: str, on_drop: Callable[[], None]) -> AccessLog | None:
    """The access log for [log] access, or None when it is off."""
    return None if target == OFF else AccessLog(target, on_drop)
