"""`tproxy top` through the daemon: the CLI asks the daemon's status socket, which asks its
workers' listing sockets; a live transfer is listed with a growing byte count. The workers the
daemon runs write the access log of [log] access too."""

from __future__ import annotations

import json
import os
import sys

from lab import LAN, WAN, Lab
from tests.kernel.test_daemon import Tproxyd, config, eventually, serve_body


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
