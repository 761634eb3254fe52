"""The rendered-config cache: an unchanged file is not parsed again, any edit is, and an entry
anyone else could have written is never unpickled."""

from __future__ import annotations

import os

import pytest

from tproxyd.reconciler import desired_cache
from tproxyd.state.desired import render
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import load

CONFIG = ('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
          'destinations = ["198.18.0.0/24", "198.18.4.0/22", "2001:db8::/32"]\n'
          'exclude = ["198.18.0.128/25"]\n')


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TPROXYD_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG)
    return path, tmp_path / "cache"


def parses(monkeypatch) -> list:
    calls = []
    real = desired_cache.render

    def counting(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(desired_cache, "render", counting)
    return calls


def test_an_unchanged_file_is_rendered_once_and_comes_back_equal(setup, monkeypatch):
    path, cache = setup
    calls = parses(monkeypatch)
    first = desired_cache.load_rendered(str(path))
    second = desired_cache.load_rendered(str(path))
    assert len(calls) == 1 and len(os.listdir(cache)) == 1
    assert second.config == first.config == load(str(path))
    assert second.desired == render(load(str(path)))
    assert second.digests == first.digests and set(second.digests) == {
        s.name for s in second.desired.nft.sets}


def test_an_edit_misses(setup, monkeypatch):
    path, _ = setup
    calls = parses(monkeypatch)
    desired_cache.load_rendered(str(path))
    path.write_text(CONFIG.replace("198.18.4.0/22", "198.18.8.0/22"))
    changed = desired_cache.load_rendered(str(path))
    assert len(calls) == 2
    assert "198.18.8.0/22" in [str(c) for c in changed.config.intercepts[0].destinations]


def test_a_broken_file_still_raises_config_error(setup):
    path, _ = setup
    desired_cache.load_rendered(str(path))
    path.write_text(CONFIG + "[relay\n")
    with pytest.raises(ConfigError):
        desired_cache.load_rendered(str(path))


@pytest.mark.parametrize("damage", ["group-writable", "garbage"])
def test_an_entry_that_is_not_ours_or_not_whole_is_a_miss(setup, monkeypatch, damage):
    path, cache = setup
    desired_cache.load_rendered(str(path))
    (entry,) = list(cache.iterdir())
    if damage == "group-writable":
        entry.chmod(0o664)
    else:
        entry.write_bytes(b"\x80\x05not a pickle")
    calls = parses(monkeypatch)
    again = desired_cache.load_rendered(str(path))
    assert len(calls) == 1 and again.config == load(str(path))


def test_an_unwritable_cache_dir_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TPROXYD_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG)
    assert desired_cache.load_rendered(str(path)).config == load(str(path))


def test_old_entries_are_pruned(setup):
    path, cache = setup
    for i in range(desired_cache.KEEP + 3):
        path.write_text(CONFIG.replace("198.18.4.0/22", f"198.18.{4 * (i + 1)}.0/22"))
        desired_cache.load_rendered(str(path))
    assert len(os.listdir(cache)) == desired_cache.KEEP
