"""The access log through the real kernel path: one line per ended connection with the right
`end` and exact byte counts, a UDP session's line on expiry, a log file renamed away (rotation),
a full disk (/dev/full: lines dropped and counted, the relay carries on)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.conftest import Tproxy
from tproxyd.relay.loop import read_stats

pytestmark = pytest.mark.kernel
HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers.py")
CLIENT = os.path.join(HERE, "accesslog_client.py")
# answers "bye" to the first bytes and closes: the server finishes first
BYE = """
import socket
s = socket.create_server(("::", 7006), family=socket.AF_INET6, dualstack_ipv6=True)
while True:
    c, _ = s.accept()
    c.recv(100); c.sendall(b"bye"); c.close()
"""


def start_relay(lab: Lab, access: str, protocols: str = '["tcp"]', **relay) -> str:
    keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in relay.items())
    config = lab.write_config(lab.config(
        extra=f'[relay]\n{keys}\n[log]\naccess = "{access}"\n',
        destinations='["198.18.2.0/24", "2001:db8:2::/64"]', protocols=protocols))
    Tproxy(lab, config)("apply", check=True)
    lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345)
    return f"{lab.tmp}/state/relay.sock"


def lines(path: str, n: int, timeout: float = 20) -> list[dict]:
    """The first n lines of the log, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") if os.path.exists(path) else open(os.devnull, "rb") as f:
            got = [json.loads(x) for x in f.read().splitlines()]
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"{len(got)} lines, not {n}: {got}"
        time.sleep(0.05)


def client(lab: Lab, mode: str, port: int) -> str:
    return lab.run(lab.client, sys.executable, CLIENT, mode, WAN.peer4, str(port)).stdout.strip()


def test_each_end_gives_one_line_with_exact_bytes(lab: Lab):
    log = f"{lab.tmp}/access.log"
    start_relay(lab, log, idle_timeout=2.0)
    for mode, port in (("digest", 7001), ("reset", 7002), ("echo", 7003)):
        lab.spawn(lab.server, sys.executable, PEERS, mode, str(port))
        wait_for_port(lab, lab.server, port)
    lab.spawn(lab.server, sys.executable, "-c", BYE)
    wait_for_port(lab, lab.server, 7006)
    # mode, port, end, bytes up, bytes down (the digest peer answers "1000 <sha256>\n": 70)
    cases = [("fin", 7001, "client_fin", 1000, 70), ("read", 7006, "server_fin", 2, 3),
             ("creset", 7003, "client_reset", 500, 500), ("sreset", 7002, "server_reset", 5, 0),
             ("idle", 7003, "idle_timeout", 2, 2), ("refused", 7999, "connect_refused", 0, 0)]
    for i, (mode, port, end, up, down) in enumerate(cases):
        out = client(lab, mode, port)
        assert out.startswith(f"sent {up} got {down}"), (mode, out)
        doc = lines(log, i + 1)[i]
        assert doc["end"] == end, (mode, doc)
        assert (doc["bytes_up"], doc["bytes_down"]) == (up, down), (mode, doc)
        assert doc["proto"] == "tcp" and doc["route"] == doc["via"] == "direct"
        assert doc["dst"] == f"{WAN.peer4}:{port}"
        assert doc["client"].startswith(f"{LAN.peer4}:")
        assert (doc["connect_ms"] is None) == (end == "connect_refused"), doc
        assert "error" not in doc and "domain" not in doc
    time.sleep(0.5)
    assert len(lines(log, len(cases))) == len(cases)  # one line each, no more


def test_a_udp_session_gets_its_line_when_it_expires(lab: Lab):
    log = f"{lab.tmp}/access.log"
    start_relay(lab, log, protocols='["udp"]', udp_idle_timeout=1.0)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "5300")
    wait_for_port(lab, lab.server, 5300, "udp")
    script = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"s.settimeout(5); s.connect(('{WAN.peer4}', 5300)); "
              "[(s.send(b'q' * 100), s.recv(2000)) for _ in range(3)]")
    lab.run(lab.client, sys.executable, "-c", script)
    (doc,) = lines(log, 1)
    assert doc["proto"] == "udp" and doc["end"] == "udp_expired"
    assert doc["bytes_up"] == doc["bytes_down"] == 300
    assert doc["dst"] == f"{WAN.peer4}:5300" and doc["connect_ms"] is None
    assert doc["duration_ms"] >= 1000


def test_a_log_renamed_away_is_followed_by_a_new_file(lab: Lab):
    log = f"{lab.tmp}/access.log"
    start_relay(lab, log)
    lab.spawn(lab.server, sys.executable, PEERS, "digest", "7001")
    wait_for_port(lab, lab.server, 7001)
    client(lab, "fin", 7001)
    lines(log, 1)
    os.rename(log, log + ".1")
    time.sleep(1.2)  # the relay looks at the path at most once a second
    client(lab, "fin", 7001)
    client(lab, "fin", 7001)
    assert len(lines(log, 2)) == 2
    assert len(lines(log + ".1", 1)) == 1


def test_a_full_disk_drops_lines_counts_them_and_the_relay_carries_on(lab: Lab):
    stats = start_relay(lab, "/dev/full")
    lab.spawn(lab.server, sys.executable, PEERS, "digest", "7001")
    wait_for_port(lab, lab.server, 7001)
    for _ in range(3):
        assert client(lab, "fin", 7001) == "sent 1000 got 70 eof"
    deadline = time.monotonic() + 10
    while (counters := read_stats(stats))["closed"] < 3:
        assert time.monotonic() < deadline, counters
        time.sleep(0.05)
    assert counters["access_log_dropped"] == 3 and counters["end_tcp_client_fin"] == 3
