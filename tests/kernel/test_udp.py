"""UDP through the relay and the real kernel: dnsmasq answering dig, many clients at once,
session expiry and eviction, ICMP port unreachable, the largest datagram, a burst past the
socket buffer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.conftest import Tproxy
from tproxyd.relay.loop import read_stats

pytestmark = pytest.mark.kernel
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


def start_relay(lab: Lab, **relay):
    keys = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in relay.items())
    config = lab.write_config(lab.config(extra=f"[relay]\n{keys}\n",
                                         destinations='["198.18.2.0/24", "2001:db8:2::/64"]'))
    Tproxy(lab, config)("apply", check=True)
    proc = lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345, "udp")
    return proc, f"{lab.tmp}/state/relay.sock"


@pytest.fixture
def dns(lab: Lab):
    """dnsmasq on the server, answering example.test with fixed addresses and logging queries."""
    proc = lab.spawn(lab.server, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
                     "--log-queries", "--no-resolv", "--no-hosts", "--user=root", "--port=53",
                     "--address=/example.test/198.18.2.50", "--address=/example.test/2001:db8:2::50",
                     "--bind-interfaces", f"--listen-address={WAN.peer4}",
                     f"--listen-address={WAN.peer6}")
    wait_for_port(lab, lab.server, 53, "udp")
    return proc


def dig(lab: Lab, server: str, qtype: str = "A", check: bool = True) -> str:
    out = lab.run(lab.client, "dig", "+short", "+timeout=3", "+tries=2", f"@{server}", qtype,
                  "example.test", check=check)
    return out.stdout.strip()


def wait_stats(stats: str, predicate, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        counters = read_stats(stats)
        if predicate(counters):
            return counters
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {counters}"
        time.sleep(0.05)


@pytest.mark.parametrize("family", [4, 6])
def test_dns_answers_and_the_server_sees_the_client(lab: Lab, dns, family):
    _, stats = start_relay(lab)
    server, answer = (WAN.peer4, "198.18.2.50") if family == 4 else (WAN.peer6, "2001:db8:2::50")
    assert dig(lab, server, "A" if family == 4 else "AAAA") == answer
    client = LAN.peer4 if family == 4 else LAN.peer6
    assert f"query[{'A' if family == 4 else 'AAAA'}] example.test from {client}" in lab.log_of(dns)
    counters = read_stats(stats)
    assert counters["udp_sessions_opened"] == 1
    assert counters["udp_datagrams_up"] == counters["udp_datagrams_down"] == 1


def test_dns_without_spoofing_the_server_sees_the_gateway(lab: Lab, dns):
    start_relay(lab, spoof_source=False)
    assert dig(lab, WAN.peer4) == "198.18.2.50"
    assert f"example.test from {WAN.gw4}" in lab.log_of(dns)


@pytest.mark.parametrize("family", [4, 6])
def test_200_clients_at_once_get_only_their_own_replies(lab: Lab, family):
    _, stats = start_relay(lab)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7100")
    wait_for_port(lab, lab.server, 7100, "udp")
    host = WAN.peer4 if family == 4 else WAN.peer6
    out = lab.run(lab.client, sys.executable, PEERS, "udpmany", host, "7100", "200", "50",
                  timeout=300).stdout
    assert out.strip() == "mixed 0 lost 0"
    counters = read_stats(stats)
    assert counters["udp_sessions_opened"] == 200
    assert counters["udp_datagrams_down"] >= 200 * 50


def test_idle_sessions_expire(lab: Lab, dns):
    _, stats = start_relay(lab, udp_idle_timeout=0.5)
    assert dig(lab, WAN.peer4) == "198.18.2.50"
    counters = wait_stats(stats, lambda c: c["udp_sessions"] == 0, "the session to expire")
    assert counters["udp_expired"] == counters["end_udp_udp_expired"] == 1


def test_least_recently_used_session_is_evicted(lab: Lab, dns):
    _, stats = start_relay(lab, max_udp_sessions=2)
    for _ in range(3):  # each dig is a new client port: a new session
        assert dig(lab, WAN.peer4) == "198.18.2.50"
    counters = read_stats(stats)
    assert counters["udp_evicted"] == counters["end_udp_udp_evicted"] == 1
    assert counters["udp_sessions"] == 2


SEND_ONCE = """
import socket, sys
s = socket.socket(); s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"x" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
try:
    data = s.recv(70000)
    print(len(data), data == b"x" * int(sys.argv[3]))
except OSError as exc:
    print(type(exc).__name__)
"""


def test_port_unreachable_ends_the_session(lab: Lab):
    _, stats = start_relay(lab)
    lab.run(lab.client, sys.executable, "-c", SEND_ONCE, WAN.peer4, "7999", "10")  # nobody there
    counters = wait_stats(stats, lambda c: c["udp_icmp_errors"] == 1, "the ICMP error")
    assert counters["udp_sessions"] == 0 and counters["udp_expired"] == 0
    assert counters["end_udp_udp_icmp"] == 1


def test_the_largest_datagram_passes_unchanged(lab: Lab):
    _, stats = start_relay(lab)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7101")
    wait_for_port(lab, lab.server, 7101, "udp")
    out = lab.run(lab.client, sys.executable, "-c", SEND_ONCE, WAN.peer4, "7101", "65507")
    assert out.stdout.split() == ["65507", "True"]
    assert read_stats(stats)["udp_bytes_down"] == 65507


BURST = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"b" * 1400, (sys.argv[1], int(sys.argv[2])))
"""


def test_a_burst_past_the_socket_buffer_is_counted_and_survived(lab: Lab, dns):
    relay, stats = start_relay(lab)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7102")
    wait_for_port(lab, lab.server, 7102, "udp")
    relay.send_signal(signal.SIGSTOP)  # the relay reads nothing: its receive queue overflows
    try:
        lab.run(lab.client, sys.executable, "-c", BURST, WAN.peer4, "7102", "5000")
    finally:
        relay.send_signal(signal.SIGCONT)
    # The loop goes on; the kernel reports its drop count with the next datagram queued.
    assert dig(lab, WAN.peer4) == "198.18.2.50"
    counters = wait_stats(stats, lambda c: c["udp_kernel_drops"] > 0, "the drops to be counted")
    assert 0 < counters["udp_datagrams_up"] < 5000
    assert counters["udp_kernel_drops"] + counters["udp_datagrams_up"] >= 5000


# A burst whose datagrams relay/gso.py puts in segmented runs and alone: runs of equal sizes
# with a shorter last one, a run broken by a longer datagram, an empty datagram, one larger
# than a segment may be. Each carries its index, so order and boundaries are checked.
MIXED = [1200] * 20 + [500] + [100] * 10 + [0] + [1400] * 5 + [3000] + [1000] * 20 + [999]
MIXED_BURST = """
import json, socket, sys
sizes = json.loads(sys.argv[3])
sent = [(i.to_bytes(2, "big") * (n // 2 + 1))[:n] for i, n in enumerate(sizes)]
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hello")
s.settimeout(5)
assert s.recv(100) == b"hello"  # the session is open
print("ready", flush=True)
sys.stdin.readline()  # the relay is stopped now: the burst waits in its queue
for data in sent:
    s.send(data)
got = []
try:
    while len(got) < len(sent):
        got.append(s.recv(70000))
except OSError:
    pass
print(json.dumps({"same": got == sent, "got": len(got), "sizes": [len(d) for d in got]}))
"""


@pytest.mark.parametrize("family", [4, 6])
def test_a_burst_of_mixed_datagrams_crosses_both_ways_whole_and_in_order(lab: Lab, family):
    """Read in one burst by a relay that was stopped, the client's datagrams go to the server
    in segmented sends (counted) and come back the same: every datagram, its boundaries and
    its bytes, in order."""
    relay, stats = start_relay(lab)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7103")
    wait_for_port(lab, lab.server, 7103, "udp")
    server = WAN.peer4 if family == 4 else WAN.peer6
    client = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", MIXED_BURST,
                               server, "7103", json.dumps(MIXED)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        before = read_stats(stats)
        relay.send_signal(signal.SIGSTOP)
        try:
            client.stdin.write("go\n")
            client.stdin.flush()
            time.sleep(0.5)  # the burst reaches the stopped relay's queue
        finally:
            relay.send_signal(signal.SIGCONT)
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(out)
    assert result["same"], (result, MIXED)
    counters = read_stats(stats)
    assert counters["udp_gso_sends"] - before["udp_gso_sends"] >= 4  # the four runs up, at least
    assert counters["udp_drops"] == counters["udp_kernel_drops"] == 0
    assert counters["udp_datagrams_up"] - before["udp_datagrams_up"] == len(MIXED)
    assert counters["udp_bytes_up"] - before["udp_bytes_up"] == sum(MIXED)
