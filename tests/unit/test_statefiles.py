"""State files steer root (`down` writes back what a record holds; caches are pickles), so only
files nobody else could have written are read, and writes never follow a planted link."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from tproxyd.reconciler import statefiles, sysctl
from tproxyd.reconciler.verified import VerifiedSets
from tproxyd.state.intervals import merge

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chowns files to nobody")


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(autouse=True)
def _warn_every_time(monkeypatch):
    monkeypatch.setattr(statefiles, "_warned", set())


def test_a_file_we_wrote_reads_back_and_is_0600(state):
    path = str(state / "r.json")
    os.umask(old := os.umask(0))  # whatever the umask, the file is ours alone
    try:
        statefiles.write(path, b"{}")
    finally:
        os.umask(old)
    assert statefiles.read(path) == b"{}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(state) == ["r.json"]  # no temp file left
    assert statefiles.read(str(state / "absent")) is None


@pytest.mark.parametrize("damage", ["owned by nobody", "group-writable", "other-writable", "symlink",
                                    "fifo"])
def test_a_file_anyone_else_could_have_written_is_refused_by_name(state, caplog, damage):
    path = state / "r.json"
    path.write_bytes(b'{"a": 1}')
    path.chmod(0o600)
    if damage == "owned by nobody":
        os.chown(path, NOBODY, NOBODY)
    elif damage == "group-writable":
        path.chmod(0o620)
    elif damage == "other-writable":
        path.chmod(0o602)
    elif damage == "symlink":
        path.rename(state / "elsewhere")
        path.symlink_to(state / "elsewhere")
    else:
        path.unlink()
        os.mkfifo(path, 0o600)  # a read must not hang on it either
    with caplog.at_level(logging.WARNING, logger="tproxyd"):
        assert statefiles.read(str(path)) is None
        assert statefiles.load_pickle(str(path)) is None
    assert str(path) in caplog.text


@pytest.mark.parametrize("damage", ["owned by nobody", "world-writable"])
def test_a_directory_anyone_else_could_write_to_is_refused(state, caplog, damage):
    (state / "r.json").write_bytes(b"{}")
    (state / "r.json").chmod(0o600)
    if damage == "owned by nobody":
        os.chown(state, NOBODY, NOBODY)
    else:
        state.chmod(0o1777)
    with caplog.at_level(logging.WARNING, logger="tproxyd"):
        assert statefiles.read(str(state / "r.json")) is None
    assert str(state) in caplog.text
    with pytest.raises(PermissionError, match=str(state)):
        statefiles.write(str(state / "r.json"), b"{}")


def test_a_write_replaces_a_planted_link_instead_of_following_it(state, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (state / "r.json").symlink_to(victim)
    statefiles.write(str(state / "r.json"), b"{}")
    assert victim.read_text() == "untouched"
    assert not (state / "r.json").is_symlink() and statefiles.read(str(state / "r.json")) == b"{}"


def test_a_sysctl_record_from_someone_else_restores_nothing(state, caplog):
    memory = sysctl.SysctlMemory(str(state))
    memory.save({"net.ipv4.ip_forward": "0"})
    assert memory.load() == {"net.ipv4.ip_forward": "0"}
    os.chown(memory.path, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING, logger="tproxyd"):
        assert memory.load() == {}
    assert memory.path in caplog.text


def test_a_sysctl_record_naming_a_key_tproxyd_never_writes_loses_that_entry(state, caplog):
    memory = sysctl.SysctlMemory(str(state))
    memory.save({"net.ipv4.ip_forward": "0", "net.ipv4.conf./tmp/x.rp_filter": "1",
                 "kernel.core_pattern": "0", "net.ipv6.conf.all.forwarding": "|/bin/sh"})
    with caplog.at_level(logging.WARNING, logger="tproxyd"):
        assert memory.load() == {"net.ipv4.ip_forward": "0"}
    assert memory.path in caplog.text and "/tmp/x" in caplog.text


def test_verified_set_contents_from_someone_else_are_not_unpickled(state):
    verified = VerifiedSets(str(state))
    elements = merge([(0xC6120000, 0xC61200FF)])  # 198.18.0.0/24
    verified.save("tproxyd", 7, {"lan_dst4": ("d1", elements)})
    assert verified.contents("lan_dst4", "d1") == elements
    assert verified.trusted("tproxyd", 7) == {"lan_dst4": "d1"}
    os.chown(verified.contents_path, NOBODY, NOBODY)
    assert verified.contents("lan_dst4", "d1") is None
    os.chown(verified.record.path, NOBODY, NOBODY)
    assert verified.trusted("tproxyd", 7) == {}
    assert json.loads((state / os.path.basename(verified.record.path)).read_text())["generation"] == 7
