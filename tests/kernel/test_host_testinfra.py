"""The same host checks an operator's CI would run with pytest-testinfra, pointed at the lab's
gateway namespace: rules, routes, the nft table, sysctls and the relay port, before and after."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import testinfra
from testinfra.backend.base import CommandResult
from testinfra.backend.local import LocalBackend

from lab import Lab, wait_for_port
from tests.conftest import Tproxy

pytestmark = pytest.mark.kernel


class NetnsBackend(LocalBackend):
    """testinfra's local backend, with every command run inside one network namespace."""

    NAME = "netns"

    def __init__(self, netns: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.netns = netns

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        return self.run_local("ip netns exec %s sh -c %s", self.netns,
                              self.get_command(command, *args))


@pytest.fixture
def gateway(lab: Lab) -> testinfra.host.Host:
    return testinfra.host.Host(NetnsBackend(lab.gw))


def test_applied_gateway_as_an_operator_checks_it(lab: Lab, tproxy: Tproxy, gateway):
    tproxy("apply", check=True)

    rules = gateway.run("ip rule show")
    assert rules.rc == 0 and "10000:\tfrom all fwmark 0x1/0x1 lookup 100 proto 201" in rules.stdout
    assert "fwmark 0x1/0x1 lookup 100 proto 201" in gateway.check_output("ip -6 rule show")
    assert "local default dev lo proto 201" in gateway.check_output("ip route show table 100")
    assert "local default dev lo proto 201" in gateway.check_output("ip -6 route show table 100")
    table = gateway.run("nft list table inet tproxyd")
    assert table.rc == 0
    assert "tproxy ip to :12345" in table.stdout and "socket transparent 1" in table.stdout
    assert gateway.sysctl("net.ipv4.ip_forward") == 1
    assert gateway.file("/proc/sys/net/ipv6/conf/all/forwarding").content_string.strip() == "1"

    relay = gateway.socket("tcp://0.0.0.0:12345")
    assert not relay.is_listening
    lab.spawn_listener(lab.gw, 12345)
    wait_for_port(lab, lab.gw, 12345)
    assert relay.is_listening
    assert gateway.socket("tcp://:::12345").is_listening

    status = gateway.run(f"{sys.executable} -m tproxyd.reconciler.cli status -c {tproxy.config}")
    assert status.rc == 0 and status.stdout.strip().endswith("in sync")


def test_down_gateway_as_an_operator_checks_it(lab: Lab, tproxy: Tproxy, gateway):
    lab.sysctl(lab.gw, "net.ipv4.ip_forward", "0")
    tproxy("apply", check=True)
    tproxy("down", check=True)
    assert "lookup 100" not in gateway.check_output("ip rule show")
    assert "lookup 100" not in gateway.check_output("ip -6 rule show")
    assert gateway.check_output("ip route show table 100") == ""
    assert gateway.run("nft list table inet tproxyd").rc != 0
    assert gateway.check_output("nft list ruleset") == ""
    assert gateway.sysctl("net.ipv4.ip_forward") == 0
