"""When the daemon may take the config file: only once it has settled.

An editor saving in place truncates the file and writes it in parts; a watcher's event can
come between the parts, and a half-written file can be a valid config that captures nothing.
So a file is taken only when the same bytes, with the same inode, size, mtime and ctime, were
read twice at least `[daemon] settle` seconds apart, and did not change while being read.
Events only say "look again"; this decides, and keeps asking until the file has settled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Tuple, Union

Signature = Tuple[int, int, int, int, int]  # dev, inode, size, mtime_ns, ctime_ns


@dataclass(frozen=True)
class Snapshot:
    raw: bytes
    signature: Signature | None  # None: the file changed while it was read

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Settled:
    raw: bytes
    digest: str


@dataclass(frozen=True)
class Unsettled:
    check_again_at: float  # monotonic


@dataclass(frozen=True)
class Unreadable:
    error: OSError


Outcome = Union[Settled, Unsettled, Unreadable]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_snapshot(path: str) -> Snapshot:
    """The file's bytes, with its signature if nothing changed it (or replaced it at path)
    while it was read. Follows symlinks: a ConfigMap's key is one."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    at_path = os.stat(path)
    sig = _signature(before)
    stable = sig == _signature(after) == _signature(at_path)
    return Snapshot(b"".join(chunks), sig if stable else None)


class ConfigFile:
    def __init__(self, path: str, settle: float,
                 read: Callable[[str], Snapshot] = read_snapshot):
        self.path = path
        self.settle = settle
        self.read = read
        self.candidate: Snapshot | None = None
        self.since = 0.0  # when the candidate was first read
        self.settled: Snapshot | None = None  # the last snapshot that settled

    def check(self, now: float) -> Outcome:
        """Read the file once. Settled when this read matches the candidate from at least
        `settle` ago, or matches what settled last time (an unchanged file)."""
        try:
            snap = self.read(self.path)
        except OSError as exc:
            self.candidate = None
            self.settled = None  # whatever is read next is looked at afresh
            return Unreadable(exc)
        if snap.signature is not None and snap == self.settled:
            self.candidate = None
            return Settled(snap.raw, snap.digest)
        if snap.signature is None or snap != self.candidate:
            self.candidate = snap if snap.signature is not None else None
            self.since = now
            return Unsettled(now + self.settle)
        if now - self.since < self.settle:
            return Unsettled(self.since + self.settle)
        self.settled, self.candidate = snap, None
        return Settled(snap.raw, snap.digest)
