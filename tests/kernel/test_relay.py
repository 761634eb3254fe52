"""The relay through the real kernel path: client and server namespaces with the gateway between,
the ruleset applied by `tproxy apply`, `python -m tproxyd.relay` in the gateway, real clients
(curl, iperf3, socat) and real servers (python's http.server, iperf3, small peers)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.conftest import CURL_RESET, Tproxy
from tests.kernel.test_relay_limits import wait_until
from tproxyd.relay.loop import read_stats

pytestmark = pytest.mark.kernel
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
SIZE = 100 << 20


class Relayed(NamedTuple):
    stats: str  # the relay's stats socket
    proc: subprocess.Popen


def start_relay(lab: Lab, **relay) -> Relayed:
    """Apply a config capturing all TCP to the server network and start the relay."""
    keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in relay.items())
    config = lab.write_config(lab.config(
        extra=f"[relay]\n{keys}\n", destinations='["198.18.2.0/24", "2001:db8:2::/64"]',
        protocols='["tcp"]'))
    Tproxy(lab, config)("apply", check=True)
    proc = lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345)
    return Relayed(f"{lab.tmp}/state/relay.sock", proc)


def peer(lab: Lab, mode: str, port: int):
    proc = lab.spawn(lab.server, sys.executable, PEERS, mode, str(port))
    wait_for_port(lab, lab.server, port)
    return proc


def url(family: int, port: int, path: str = "/") -> str:
    host = WAN.peer4 if family == 4 else f"[{WAN.peer6}]"
    return f"http://{host}:{port}{path}"


def curl(lab: Lab, *args: str):
    return lab.run(lab.client, "curl", "-sS", "--max-time", "20", *args, check=False)


def assert_reset(result) -> None:
    """curl saw its connection reset (tests/conftest.py: CURL_RESET)."""
    assert result.returncode in CURL_RESET, result
    assert not result.stdout


@pytest.fixture
def web(lab: Lab):
    """python's http.server on the server, serving a 100 MB random file: (digest, process)."""
    body = os.path.join(lab.tmp, "body")
    with open(body, "wb") as f:
        f.write(os.urandom(SIZE))
    with open(body, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    proc = lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
                     "--directory", lab.tmp, "8080")
    wait_for_port(lab, lab.server, 8080)
    return digest, proc


@pytest.mark.parametrize("mode", ["tproxy", "redirect"])
@pytest.mark.parametrize("family", [4, 6])
def test_100mb_cross_exactly_and_the_server_sees_the_client(lab: Lab, web, mode, family):
    relay = start_relay(lab, mode=mode)
    got = lab.run(lab.client, "sh", "-c", f"curl -sS --max-time 60 {url(family, 8080, '/body')}"
                                          " | sha256sum").stdout.split()[0]
    assert got == web[0]
    client = LAN.peer4 if family == 4 else LAN.peer6
    assert f"{client} - - " in lab.log_of(web[1])  # http.server logs the peer it saw
    counters = read_stats(relay.stats)
    assert counters["bytes_down"] >= SIZE and counters["accepted"] == 1  # the relay carried it


@pytest.mark.parametrize("family", [4, 6])
def test_without_spoofing_the_server_sees_the_gateway(lab: Lab, web, family):
    start_relay(lab, spoof_source=False)
    assert curl(lab, "-o", "/dev/null", url(family, 8080, "/body")).returncode == 0
    gateway = WAN.gw4 if family == 4 else WAN.gw6
    log = lab.log_of(web[1])
    assert f"{gateway} - - " in log and (LAN.peer4 if family == 4 else LAN.peer6) not in log


def test_iperf3_through_the_relay(lab: Lab):
    relay = start_relay(lab)
    lab.spawn(lab.server, "iperf3", "-s", "-p", "5201")
    wait_for_port(lab, lab.server, 5201)
    result = lab.run(lab.client, "iperf3", "-c", WAN.peer4, "-p", "5201", "-t", "2", "-J")
    report = json.loads(result.stdout)
    sent = report["end"]["sum_sent"]["bytes"]
    assert sent > 0 and report["end"]["sum_received"]["bytes"] > 0
    assert read_stats(relay.stats)["bytes_up"] >= sent * 0.99


def test_a_conntrack_flush_mid_connection_loses_nothing(lab: Lab):
    """The ruleset recognises replies to the relay's spoofed connections by their conntrack
    mark. A flush (conntrack -F) forgets it: the server's next packet starts a new entry, from
    the server's side, unmarked; it must still reach the relay's socket, not the client.
    Early demux would hand it to the socket regardless: off, as routers often run, so the
    ruleset alone delivers."""
    lab.sysctl(lab.gw, "net.ipv4.ip_early_demux", "0")
    relay = start_relay(lab)
    lab.spawn(lab.server, sys.executable, PEERS, "late", "7003", "2")
    wait_for_port(lab, lab.server, 7003)
    client = lab.spawn(lab.client, sys.executable, PEERS, "talk", WAN.peer4, "7003")
    wait_until(lambda: "got b'hi" in lab.log_of(client), "the server's first answer", timeout=10)
    # within the server's 2 s pause, once the last ACKs are through: the server's "late" must
    # be the first packet conntrack sees again
    time.sleep(0.5)
    lab.run(lab.gw, "conntrack", "-F")
    assert client.wait(timeout=20) == 0, lab.log_of(client)
    assert lab.log_of(client).splitlines() == ["got b'hi\\n'", "got b'late\\n'", "got b'more\\n'"]
    counters = read_stats(relay.stats)
    assert counters["accepted"] == 1 and counters["bytes_down"] == len("hi\nlate\nmore\n")


def test_half_close_a_client_that_stops_writing_still_reads(lab: Lab):
    start_relay(lab)
    peer(lab, "digest", 7001)
    # socat sends stdin, shuts down writing at its end (FIN), and keeps reading for 5 s.
    out = lab.run(lab.client, "socat", "-t", "5", "-", f"TCP:{WAN.peer4}:7001", input="hello\n")
    assert out.stdout == f"6 {hashlib.sha256(b'hello' + bytes([10])).hexdigest()}\n"


def test_server_reset_reaches_the_client(lab: Lab):
    relay = start_relay(lab)
    peer(lab, "reset", 7002)
    assert_reset(curl(lab, url(4, 7002)))
    counters = read_stats(relay.stats)
    assert counters["resets"] == counters["end_tcp_server_reset"] == 1


def test_refused_by_the_server_the_client_sees_a_reset(lab: Lab):
    relay = start_relay(lab)
    assert_reset(curl(lab, url(4, 7999)))  # nothing listens on the server
    counters = read_stats(relay.stats)
    assert counters["failed"] == counters["end_tcp_connect_refused"] == 1


def test_unroutable_destination_resets_the_client(lab: Lab):
    """The gateway has no route to 198.19.0.0/16: connect fails at once (ENETUNREACH)."""
    config = lab.write_config(lab.config(destinations='["198.19.0.0/16"]', protocols='["tcp"]'))
    Tproxy(lab, config)("apply", check=True)
    lab.ip(lab.client, "route", "add", "198.19.0.0/16", "via", LAN.gw4)
    proc = lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345)
    assert_reset(curl(lab, "http://198.19.0.1/"))
    counters = read_stats(f"{lab.tmp}/state/relay.sock")
    assert counters["failed"] == counters["end_tcp_unreachable"] == 1
    assert "unreachable" in lab.log_of(proc).lower()


def test_connect_timeout_to_a_blackholed_destination(lab: Lab):
    lab.run(lab.server, "nft", "add table inet blackhole; "
            "add chain inet blackhole input { type filter hook input priority 0; }; "
            "add rule inet blackhole input tcp dport 7998 drop")
    relay = start_relay(lab, connect_timeout=1.0)
    started = time.monotonic()
    result = curl(lab, url(4, 7998))
    assert result.returncode == 56 and "reset" in result.stderr.lower(), result
    assert 0.9 <= time.monotonic() - started < 10
    counters = read_stats(relay.stats)
    assert counters["connect_timeouts"] == counters["end_tcp_connect_timeout"] == 1
    assert counters["active"] == 0


IDLE_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7003), timeout=10)
c.sendall(b"x\\n"); assert c.recv(10) == b"x\\n"
try:
    print(repr(c.recv(10)))
except ConnectionResetError:
    print("reset")
"""


def test_idle_connections_are_reset(lab: Lab):
    relay = start_relay(lab, idle_timeout=1.0)
    peer(lab, "echo", 7003)
    out = lab.run(lab.client, sys.executable, "-c", IDLE_CLIENT, WAN.peer4)
    assert out.stdout.strip() == "reset"
    assert read_stats(relay.stats)["idle_timeouts"] == 1


def test_max_connections_refuses_past_the_limit(lab: Lab):
    relay = start_relay(lab, max_connections=3)
    peer(lab, "echo", 7004)
    holder = lab.spawn(lab.client, sys.executable, PEERS, "hold", WAN.peer4, "7004", "3", "30")
    deadline = time.monotonic() + 20
    while "held 3" not in lab.log_of(holder):
        assert time.monotonic() < deadline, lab.log_of(holder)
        time.sleep(0.05)
    assert_reset(curl(lab, url(4, 7004)))
    counters = read_stats(relay.stats)
    assert counters["refused"] == 1 and counters["active"] == 3


def test_2000_concurrent_connections_held_open(lab: Lab):
    relay = start_relay(lab, max_connections_per_client=2000)  # one client holds them all
    peer(lab, "echo", 7005)
    holder = lab.spawn(lab.client, sys.executable, PEERS, "hold", WAN.peer4, "7005", "2000", "3")
    deadline = time.monotonic() + 120
    while "held 2000" not in lab.log_of(holder):
        assert holder.poll() is None, lab.log_of(holder)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert read_stats(relay.stats)["active"] == 2000
    assert holder.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while read_stats(relay.stats)["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    counters = read_stats(relay.stats)
    assert counters["accepted"] == 2000 and counters["resets"] == 0 and counters["failed"] == 0


def test_a_loop_to_the_relay_itself_is_refused(lab: Lab):
    relay = start_relay(lab)
    # The gateway's own address at the relay port: not captured (it is local), but it reaches
    # the relay's listener, whose original destination is then the relay itself.
    assert_reset(curl(lab, f"http://{LAN.gw4}:12345/"))
    assert read_stats(relay.stats)["loops"] == 1
    assert "refused a loop" in lab.log_of(relay.proc)


def test_sigterm_stops_the_relay_cleanly(lab: Lab):
    relay = start_relay(lab)
    assert lab.stop(relay.proc) == 0
    assert "stopped:" in lab.log_of(relay.proc)
