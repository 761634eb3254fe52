"""The README's main job: tproxyd in a lab gateway on the example config, end to end.
`python -m lab demo` from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tproxyd.reconciler.daemon import query

from .netns import LAN, ROOT, WAN, Lab, wait_for_port

EXAMPLE = os.path.join(ROOT, "tproxy.toml.example")


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _show(proc: subprocess.CompletedProcess) -> None:
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.stdout.flush()


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def demo(example: str = EXAMPLE, port: int = 12345) -> int:
    """Build a lab, run tproxyd in its gateway on the example config, relay a client's requests,
    edit the config, break the rules by hand, and stop."""
    tproxy = [sys.executable, "-m", "tproxyd.reconciler.cli"]
    with open(example) as f:
        text = f.read()
    with Lab() as lab:
        # The example, adapted to the lab: the state directory lives with the lab.
        text = text.replace('"/run/tproxyd', f'"{lab.tmp}/state')
        os.makedirs(os.path.join(lab.tmp, "etc"))
        config = lab.write_config(text, "etc/tproxy.toml")
        print(f"lab: client {lab.client} ({LAN.peer4}, {LAN.peer6}) -- gateway {lab.gw} -- "
              f"server {lab.server} ({WAN.peer4}, {WAN.peer6}); config {config}")
        _step("tproxy check")
        _show(lab.run(lab.gw, *tproxy, "check", "-c", config, check=False))
        _step("tproxy plan: what the daemon will do")
        _show(lab.run(lab.gw, *tproxy, "plan", "-c", config, check=False))

        _step("tproxyd starts in the gateway: it converges and supervises the relay")
        daemon = lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.reconciler.daemon", "-c", config)
        sock = os.path.join(lab.tmp, "state", "tproxyd.sock")
        if not _until(lambda: os.path.exists(sock)):
            print(lab.log_of(daemon))
            return 1
        wait_for_port(lab, lab.gw, port)
        with open(os.path.join(lab.tmp, "index.html"), "w") as f:
            f.write("hello from the server\n")
        web = lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
                        "--directory", lab.tmp, "80")
        wait_for_port(lab, lab.server, 80)
        _step("the client fetches a page from the server, IPv4 and IPv6")
        for url in (f"http://{WAN.peer4}/index.html", f"http://[{WAN.peer6}]/index.html"):
            print(f"client$ curl {url}")
            _show(lab.run(lab.client, "curl", "-sS", "--max-time", "5", url, check=False))
        print("the server's log: it saw the client's own address, not the gateway's")
        print("".join(f"  {line}\n" for line in lab.log_of(web).splitlines() if "GET" in line))
        _step("tproxy status: the daemon's view, and each object in sync")
        _show(lab.run(lab.gw, *tproxy, "status", "-c", config, check=False))

        _step("edit tproxy.toml: exclude the server; the daemon converges by itself")
        with open(config) as f:
            body = f.read()
        with open(config, "w") as f:
            f.write(body.replace('exclude = ["10.0.0.0/8"', f'exclude = ["{WAN.peer4}/32", "10.0.0.0/8"'))
        ok = _until(lambda: WAN.peer4 in lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd",
                                                 "lan_exclude4", check=False).stdout)
        print(f"lan_exclude4 holds {WAN.peer4}: {ok}")
        _step("a typo: the daemon keeps the last good config and says why")
        with open(config, "w") as f:
            f.write(body.replace("port = 12345", "port = 123456", 1))
        _until(lambda: bool(query(sock).get("config_error")))
        print(query(sock)["config_error"])
        with open(config, "w") as f:
            f.write(body)
        _until(lambda: not query(sock).get("config_error"))

        _step("someone flushes the table by hand; the daemon repairs it")
        lab.run(lab.gw, "nft", "flush", "table", "inet", "tproxyd")
        ok = _until(lambda: lab.run(lab.gw, *tproxy, "plan", "-c", config, check=False).returncode == 0)
        print(f"repaired: {ok}")
        _step("SIGTERM: the relay drains, everything tproxyd owned is removed")
        lab.stop(daemon, timeout=60)
        print("\n".join([line for line in lab.log_of(daemon).splitlines() if "tproxyd[" in line][-3:]))
        left = lab.run(lab.gw, "nft", "list", "ruleset").stdout.strip()
        rules = lab.run(lab.gw, "ip", "rule").stdout
        print(f"left behind: nft {left if left else 'nothing'}; "
              f"fwmark rules {'none' if 'fwmark' not in rules else rules}")
        _step("tearing the lab down")
    print("done: the namespaces are gone")
    return 0
