"""`tproxy top` through the daemon: the CLI asks the daemon's status socket, which asks its
workers' listing sockets; a live transfer and a live UDP session are listed with growing byte
counts. The workers the
daemon runs write the access log of [log] access too."""

from __future__ import annotations

import json
import os
import sys

from lab import LAN, WAN, Lab, wait_for_port
from tests.kernel.test_daemon import Tproxyd, config, eventually, serve_body

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


def test_top_once_json_lists_a_live_transfer_with_a_growing_byte_count(lab: Lab):
    serve_body(lab, 60 << 20)
    log = os.path.join(lab.tmp, "access.log")
    d = Tproxyd(lab, config(lab, extra=f'[relay]\nworkers = 2\n[log]\naccess = "{log}"\n'))
    transfer = lab.spawn(lab.client, "sh", "-c", f"curl -sS --limit-rate 6M -o /dev/null "
                                                 f"http://{WAN.peer4}:8080/body")

    def top() -> dict:
        out = d.tproxy("top", "--once", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def transfer_row() -> dict | None:
        doc = top()
        rows = [r for r in doc["connections"] if r["dst"] == f"{WAN.peer4}:8080"]
        return rows[0] if rows and rows[0]["bytes_down"] > 0 else None

    first = eventually(transfer_row, "the transfer in tproxy top")
    assert first["client"].startswith(f"{LAN.peer4}:")
    assert first["route"] == first["via"] == "direct" and first["state"] == "relaying"
    second = eventually(lambda: (r := transfer_row()) and r["bytes_down"] > first["bytes_down"]
                        and r, "a growing byte count")
    assert second["rate_down"] is not None and second["rate_down"] > 0
    doc = top()
    assert doc["workers"] == 2 and doc["open"] >= 1 and doc["bytes_down"] >= second["bytes_down"]
    text = d.tproxy("top", "--once")
    assert text.returncode == 0 and f"{WAN.peer4}:8080" in text.stdout, text
    assert transfer.wait(timeout=60) == 0
    # the worker that carried it logged it when it ended
    (entry,) = eventually(lambda: logged(log), "the transfer's access-log line")
    assert entry["dst"] == f"{WAN.peer4}:8080" and entry["end"] in ("client_fin", "server_fin")
    assert entry["bytes_down"] > 60 << 20


UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], 7100))
for _ in range(150):  # one session, 100 bytes each way every 0.1 s for 15 s
    s.send(b"u" * 100)
    try:
        s.recv(65536)
    except TimeoutError:
        pass
    time.sleep(0.1)
"""


def test_top_lists_a_live_udp_session_with_the_connections(lab: Lab):
    serve_body(lab, 60 << 20)
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7100")
    wait_for_port(lab, lab.server, 7100, "udp")
    d = Tproxyd(lab, config(lab))
    lab.spawn(lab.client, "sh", "-c", f"curl -sS --limit-rate 2M -o /dev/null "
                                      f"http://{WAN.peer4}:8080/body")
    lab.spawn(lab.client, sys.executable, "-c", UDP_CLIENT, WAN.peer4)

    def rows() -> dict[str, dict]:
        out = d.tproxy("top", "--once", "--json")
        assert out.returncode == 0, out.stderr
        return {r["proto"]: r for r in json.loads(out.stdout)["connections"]
                if r["dst"] in (f"{WAN.peer4}:7100", f"{WAN.peer4}:8080")}

    first = eventually(lambda: (r := rows()) and len(r) == 2 and r["udp"]["bytes_down"] and r,
                       "the session and the transfer in tproxy top", timeout=10)
    udp = first["udp"]
    assert udp["dst"] == f"{WAN.peer4}:7100" and udp["client"].startswith(f"{LAN.peer4}:")
    assert udp["route"] == udp["via"] == "direct" and udp["state"] == "relaying"
    assert first["tcp"]["dst"] == f"{WAN.peer4}:8080"
    later = eventually(lambda: (r := rows().get("udp")) and r["bytes_up"] > udp["bytes_up"]
                       and r, "the session's bytes growing", timeout=10)
    assert later["bytes_down"] > udp["bytes_down"] and later["rate_up"] is not None
    text = d.tproxy("top", "--once").stdout
    (line,) = [ln for ln in text.splitlines() if f"{WAN.peer4}:7100" in ln]
    assert line.split()[0] == "udp" and line.split()[1].startswith(f"{LAN.peer4}:")
    assert "1 UDP sessions" in text.splitlines()[0]


def logged(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_top_without_a_daemon_says_so(lab: Lab):
    path = lab.write_config(config(lab))
    out = lab.run(lab.gw, sys.executable, "-m", "tproxyd.reconciler.cli", "top", "--once",
                  "-c", path, check=False)
    assert out.returncode == 1 and "no daemon answers" in out.stderr
