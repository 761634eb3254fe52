"""When the daemon may take the config file: settled bytes only, whatever the events say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tproxyd.reconciler.config_file import (
    ConfigFile,
    Settled,
    Snapshot,
    Unreadable,
    Unsettled,
    read_snapshot,
)

SETTLE = 0.2


class FakeFile:
    """A file whose content and signature the test sets; each read sees the current ones."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.mtime, self.error = raw, 1, None

    def write(self, raw: bytes) -> None:
        self.raw, self.mtime = raw, self.mtime + 1

    def __call__(self, path: str) -> Snapshot:
        if self.error:
            raise self.error
        return Snapshot(self.raw, (1, 2, len(self.raw), self.mtime, self.mtime))


def test_a_new_file_is_taken_only_after_two_equal_reads_settle_apart():
    f = FakeFile(b"[relay]\n")
    cf = ConfigFile("t.toml", SETTLE, f)
    assert cf.check(0.0) == Unsettled(0.2)
    assert cf.check(0.1) == Unsettled(0.2)
    out = cf.check(0.2)
    assert isinstance(out, Settled) and out.raw == b"[relay]\n"
    assert isinstance(cf.check(5.0), Settled)  # unchanged since: settled at once


def test_a_change_between_the_reads_starts_the_wait_again():
    f = FakeFile(b"[relay]\n")
    cf = ConfigFile("t.toml", SETTLE, f)
    cf.check(0.0)
    f.write(b"[relay]\n[[intercept]]\n")  # the rest of a two-part save
    assert cf.check(0.2) == Unsettled(0.4)
    assert isinstance(cf.check(0.4), Settled)


def test_same_bytes_rewritten_is_a_change_too():
    """The bytes alone can come round again mid-save (a burst of saves of the same text)."""
    f = FakeFile(b"[relay]\n")
    cf = ConfigFile("t.toml", SETTLE, f)
    cf.check(0.0)
    f.write(b"[relay]\n")
    assert cf.check(0.3) == Unsettled(0.5)


def test_a_file_that_keeps_changing_never_settles():
    f = FakeFile(b"a")
    cf = ConfigFile("t.toml", SETTLE, f)
    for step in range(50):
        f.write(b"a" * (step % 3 + 1))
        assert isinstance(cf.check(step * 0.3), Unsettled)


def test_a_file_that_changed_while_read_is_not_settled():
    cf = ConfigFile("t.toml", SETTLE, lambda path: Snapshot(b"[relay]\n", None))
    for t in (0.0, 0.5, 1.0):
        assert isinstance(cf.check(t), Unsettled)


def test_an_unreadable_file_is_reported_and_looked_at_afresh_after():
    f = FakeFile(b"[relay]\n")
    cf = ConfigFile("t.toml", SETTLE, f)
    cf.check(0.0)
    assert isinstance(cf.check(0.2), Settled)
    f.error = FileNotFoundError(2, "No such file or directory")
    assert isinstance(cf.check(1.0), Unreadable)
    f.error = None
    assert cf.check(2.0) == Unsettled(2.2)  # back, but it must settle again


def test_read_snapshot_on_a_real_file(tmp_path: Path):
    path = tmp_path / "tproxy.toml"
    path.write_bytes(b"[relay]\n")
    snap = read_snapshot(str(path))
    st = os.stat(path)
    assert snap.raw == b"[relay]\n" and snap.signature == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with pytest.raises(FileNotFoundError):
        read_snapshot(str(tmp_path / "absent.toml"))
