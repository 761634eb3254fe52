"""sysctl_path: a dotted key becomes a path under /proc/sys, and nothing else ever does."""

from __future__ import annotations

import pytest

from tproxyd.reconciler import sysctl


@pytest.mark.parametrize(("key", "path"), [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    ("net.ipv6.conf.all.forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"),
    ("net.ipv4.conf.eth0.100.rp_filter", "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"),  # a VLAN
    ("net.bridge.bridge-nf-call-iptables", "/proc/sys/net/bridge/bridge-nf-call-iptables"),
])
def test_a_key_maps_under_proc_sys(key, path):
    assert sysctl.sysctl_path(key) == path


@pytest.mark.parametrize("key", [
    "net.ipv4.conf./tmp/x.rp_filter",
    "net.ipv4.conf.lo/../../../../../tmp/x.rp_filter",
    "net.ipv4.conf.../rp_filter",
    "net.ipv4.conf.x y.rp_filter",
    "net./etc/passwd",
    "/etc/passwd",
    "net..ip_forward",
    "net.ipv4.",
    "",
])
def test_a_key_that_would_leave_proc_sys_is_refused(key, tmp_path, monkeypatch):
    monkeypatch.setattr(sysctl, "PROC_SYS", str(tmp_path / "sys"))
    with pytest.raises(ValueError, match="sysctl"):
        sysctl.sysctl_path(key)
    with pytest.raises(ValueError):
        sysctl.write(key, "1")
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
