"""The relay's resource limits in tproxy.toml (issue 11, items 5 and 6): sizes with units,
defaults, refusals that name the key, and the example documenting each."""

from __future__ import annotations

import os

import pytest

from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import loads

MINIMAL = '[[intercept]]\ninterfaces = ["lan0"]\n'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "t.toml")
    return str(info.value).splitlines()


def test_defaults():
    relay = loads(MINIMAL).relay
    assert relay.max_pipe_memory == 256 << 20
    assert relay.max_connections_per_client == relay.max_udp_sessions_per_client == 1024


@pytest.mark.parametrize("key", ["max_connections_per_client", "max_udp_sessions_per_client"])
def test_per_client_limits(key):
    assert getattr(loads(f"[relay]\n{key} = 3\n{MINIMAL}").relay, key) == 3
    for bad, words in (("0", "out of range"), ('"10"', "must be an integer")):
        lines = problems(f"[relay]\n{key} = {bad}\n")
        assert any(ln.startswith(f"t.toml: relay.{key}:") and words in ln for ln in lines), lines


@pytest.mark.parametrize("value, size", [
    ("268435456", 256 << 20), ('"256MiB"', 256 << 20), ('"64KiB"', 64 << 10),
    ('"1GiB"', 1 << 30), ('"4096B"', 4096), ('"4096"', 4096), ('" 2 MiB "', 2 << 20), ("0", 0),
])
def test_pipe_memory_sizes(value, size):
    assert loads(f"[relay]\nmax_pipe_memory = {value}\n{MINIMAL}").relay.max_pipe_memory == size


@pytest.mark.parametrize("value, words", [
    ('"256MB"', "not a size"), ('"lots"', "not a size"), ('"-1MiB"', "not a size"),
    ("-1", "out of range"), ("1.5", "not a size"), ("true", "not a size"),
    ('"2048GiB"', "out of range"),
])
def test_pipe_memory_refusals_name_the_key(value, words):
    lines = problems(f"[relay]\nmax_pipe_memory = {value}\n")
    assert any(ln.startswith("t.toml: relay.max_pipe_memory:") and words in ln
               for ln in lines), lines


@pytest.mark.parametrize("key", ["max_pipe_memory", "max_connections_per_client",
                                 "max_udp_sessions_per_client"])
def test_the_example_documents_the_key(key):
    with open(os.path.join(ROOT, "tproxy.toml.example")) as f:
        lines = f.read().splitlines()
    index = next((i for i, ln in enumerate(lines) if ln.startswith(f"{key} =")), None)
    assert index is not None and lines[index - 1].startswith("#"), key
    example = loads("\n".join(lines)).relay
    assert getattr(example, key) == getattr(loads(MINIMAL).relay, key)  # shows the default
