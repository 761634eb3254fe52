"""With the ruleset applied, a client's connection to the server's address is accepted by a
transparent listener in the gateway, and getsockname() there is the server's address. Traffic
the config does not capture (another port, an excluded address) still reaches the real server."""

from __future__ import annotations

import sys

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.conftest import Tproxy

pytestmark = pytest.mark.kernel


def curl(lab: Lab, url: str) -> str:
    return lab.run(lab.client, "curl", "-sS", "--max-time", "5", url).stdout


@pytest.fixture
def servers(lab: Lab):
    """A transparent listener on the relay port in the gateway, a real HTTP server on the server."""
    lab.spawn_listener(lab.gw, 12345)
    lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::", "--directory",
              lab.tmp, "8080")
    wait_for_port(lab, lab.gw, 12345)
    wait_for_port(lab, lab.server, 8080)
    with open(f"{lab.tmp}/who", "w") as f:
        f.write("the real server\n")


@pytest.mark.parametrize("server, client", [(WAN.peer4, LAN.peer4), (f"[{WAN.peer6}]", LAN.peer6)])
def test_captured_connection_reaches_the_listener_with_the_original_destination(
        lab: Lab, servers, server: str, client: str):
    before = curl(lab, f"http://{server}:8080/who")
    assert before == "the real server\n"  # plain forwarding first: the lab routes

    config = lab.write_config(lab.config(ports="[8080]"))
    Tproxy(lab, config)("apply", check=True)
    answer = curl(lab, f"http://{server}:8080/who")
    assert answer.splitlines() == [f"original-destination {server.strip('[]')} 8080",
                                   f"client {client} " + answer.split()[-1]]


def test_what_is_not_captured_goes_through(lab: Lab, servers):
    config = lab.write_config(lab.config(ports='["8000-8079"]', exclude=f'["{WAN.peer6}/128"]',
                                         destinations='["0.0.0.0/0", "::/0"]'))
    Tproxy(lab, config)("apply", check=True)
    assert curl(lab, f"http://{WAN.peer4}:8080/who") == "the real server\n"  # port not captured
    config = lab.write_config(lab.config(ports="[8080]", exclude=f'["{WAN.peer6}/128"]',
                                         destinations='["0.0.0.0/0", "::/0"]'))
    Tproxy(lab, config)("apply", check=True)
    assert curl(lab, f"http://[{WAN.peer6}]:8080/who") == "the real server\n"  # excluded
    assert curl(lab, f"http://{WAN.peer4}:8080/who").startswith("original-destination")


def test_gateway_own_address_is_never_captured(lab: Lab, servers):
    """Traffic to the gateway itself (fib daddr type local) stays local: here, refused."""
    Tproxy(lab, lab.write_config(lab.config()))("apply", check=True)
    result = lab.run(lab.client, "curl", "-sS", "--max-time", "5", f"http://{LAN.gw4}:8080/",
                     check=False)
    assert result.returncode == 7, result  # connection refused: nobody listens there
    assert "original-destination" not in result.stdout
