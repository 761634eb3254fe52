"""The README's main job runs end to end and leaves nothing behind."""

from __future__ import annotations

import sys

import pytest

from lab import ROOT, run_own_lab

pytestmark = pytest.mark.kernel


def test_demo_relays_and_cleans_up(lab):  # the lab fixture: root and tools are there
    result, left = run_own_lab([sys.executable, "-m", "lab", "demo"], cwd=ROOT,  # as the README says
                               timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("hello from the server") == 2
    assert "198.18.1.2 - - " in out and "2001:db8:1::2 - - " in out  # the server saw the client
    assert "lan_exclude4 holds 198.18.2.2: True" in out  # the edited config converged
    assert "relay.port: 123456 is out of range" in out  # a typo is named, not applied
    assert "repaired: True" in out
    assert "left behind: nft nothing; fwmark rules none" in out
    assert out.rstrip().endswith("done: the namespaces are gone")
    assert left == []
