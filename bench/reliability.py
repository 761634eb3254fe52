"""`python -m bench.reliability`: the relay's figures under attack (issue 11), in its own lab.

    descriptors   descriptors per idle and per stalled bulk connection
    fdlimit       64 descriptors, 60 connections and stats requests: accepted, reset, CPU
    pipes         pipe memory held by 50 stalled uploads, default budget and a 4 MiB one
    idle2000      2,000 idle connections from one client: the per-client limit, the idle
                  timeout and a stop clearing them

Prints one JSON line per figure. Needs root (namespaces), except `pipes` (loopback).
RELAY_TREE=DIR runs the relay from DIR/tproxyd (an older tree, `git archive COMMIT relay
state`) with `python -S`, for before-and-after figures.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import termios
import threading
import time

from lab.netns import WAN, Lab, wait_for_port
from tproxyd.relay.loop import Relay, Settings, read_stats

from .__main__ import DESTINATIONS, PEERS, TPROXY, cpu_seconds

# N connections, each sends a line and checks its echo; prints the count held and reset,
# then holds them for SECONDS.
HOLD = r"""
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held, reset = [], 0
for i in range(n):
    try:
        c = socket.create_connection((host, port), timeout=10)
        c.sendall(b"%d\n" % i)
        if c.recv(64) != b"%d\n" % i:
            raise ConnectionResetError
        held.append(c)
    except OSError:
        reset += 1
print(f"held {len(held)} reset {reset} at {time.time()}", flush=True)
time.sleep(seconds)
"""

# a server that accepts and never reads
STALL = r"""
import socket, sys, time
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=1024)
conns = []
while True:
    conns.append(s.accept()[0])
"""

# N uploads pushed until the server side takes nothing more; then held
PUSH = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns, chunk = [], b"x" * 65536
for _ in range(n):
    c = socket.create_connection((host, port), timeout=10)
    c.setblocking(False)
    conns.append(c)
    quiet = time.monotonic()
    while time.monotonic() - quiet < 0.3:
        try:
            c.send(chunk)
            quiet = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
print("pushed", flush=True)
time.sleep(600)
"""


def until(predicate, timeout: float = 120.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise SystemExit("timed out")


def stats_or_none(path: str) -> dict | None:
    try:
        return read_stats(path, 2.0)
    except (OSError, ValueError):
        return None


def start(lab: Lab, wrap: tuple[str, ...] = (), **relay) -> tuple:
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in relay.items())
    config = lab.write_config(lab.config(extra=f"[relay]\n{keys}", protocols='["tcp"]',
                                         destinations=DESTINATIONS))
    lab.run(lab.gw, *TPROXY, "apply", "-c", config)
    old = os.environ.get("RELAY_TREE")  # a directory holding an older tproxyd/relay, state
    python = (sys.executable, "-S") if old else (sys.executable,)  # -S: not the installed one
    proc = lab.spawn(lab.gw, *wrap, *python, "-m", "tproxyd.relay", "-c", config,
                     env={"PYTHONPATH": old} if old else None)
    wait_for_port(lab, lab.gw, 12345)
    stats = f"{lab.tmp}/state/relay.sock"
    pid = until(lambda: stats_or_none(stats))["pid"]
    return proc, stats, pid


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def descriptors() -> None:
    with Lab(forwarding=True) as lab:
        _, stats, pid = start(lab, max_connections_per_client=4096)
        lab.spawn(lab.server, sys.executable, PEERS, "echo", "7005")
        lab.spawn(lab.server, sys.executable, "-c", STALL, "7006")
        wait_for_port(lab, lab.server, 7006)
        base = fds(pid)
        holder = lab.spawn(lab.client, sys.executable, "-c", HOLD, WAN.peer4, "7005", "500", "600")
        until(lambda: "held" in lab.log_of(holder))
        idle = fds(pid)
        pusher = lab.spawn(lab.client, sys.executable, "-c", PUSH, WAN.peer4, "7006", "20")
        until(lambda: "pushed" in lab.log_of(pusher))
        bulk = fds(pid)
        emit(figure="descriptors", idle_per_connection=(idle - base) / 500,
             stalled_upload_per_connection=(bulk - idle) / 20, base=base,
             pipe_memory=read_stats(stats)["pipe_memory"])


def fdlimit() -> None:
    from tests.kernel.test_relay_limits import MANY

    with Lab(forwarding=True) as lab:
        _, stats, pid = start(lab, ("setpriv", "--bounding-set", "-sys_resource", "prlimit",
                                    "--nofile=64:64"))
        lab.spawn(lab.server, sys.executable, PEERS, "echo", "7010")
        wait_for_port(lab, lab.server, 7010)
        client = lab.spawn(lab.client, sys.executable, "-c", MANY, WAN.peer4, "7010", "60", "8")
        until(lambda: "sent" in lab.log_of(client))
        time.sleep(2)
        before, started, answered = cpu_seconds(pid), time.monotonic(), 0
        for _ in range(10):
            answered += stats_or_none(stats) is not None
            time.sleep(0.2)
        cpu = cpu_seconds(pid) - before
        wall = time.monotonic() - started
        held = read_stats(stats)
        client.wait(timeout=60)
        emit(figure="fdlimit", nofile=64, connections=60, accepted=held["accepted"],
             client=lab.log_of(client).split("\n")[1], fd_shortages=held.get("fd_shortages"),
             stats_answered=f"{answered}/10", cpu_s=round(cpu, 3), over_s=round(wall, 2),
             resets=held["resets"], over_limit=held.get("end_tcp_over_limit", held["refused"]),
             failed=held["failed"])


def pipes() -> None:
    for budget in (256 << 20, 4 << 20):
        pipes_with(budget)


def pipes_with(budget: int) -> None:
    """In-process on loopback, so the bytes sitting in each pipe can be asked (FIONREAD)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=256)
    stalled: list[socket.socket] = []
    threading.Thread(target=lambda: [stalled.append(server.accept()[0]) for _ in range(50)],
                     daemon=True).start()
    upstream = server.getsockname()
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False,
                           spoof_source=False, max_pipe_memory=budget),
                  original_dst=lambda s: upstream)
    (addr,) = relay.open()
    loop = threading.Thread(target=relay.run, daemon=True)
    loop.start()
    clients = []
    for _ in range(50):
        c = socket.create_connection(addr)
        c.setblocking(False)
        clients.append(c)
        quiet = time.monotonic()
        while time.monotonic() - quiet < 0.3:
            try:
                c.send(b"x" * 65536)
                quiet = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
    flows = [f for conn in list(relay.connections) for f in (conn.up, conn.down) if f.pipe]
    held = sum(int.from_bytes(fcntl.ioctl(f.pipe[0], termios.FIONREAD, b"\0" * 4), "little")
               for f in flows)
    stats = relay.stats()
    emit(figure="pipes", stalled_uploads=50, max_pipe_memory=budget,
         flows_with_pipe=len(flows), capacity_per_connection=stats["pipe_memory"] / 50,
         held_per_connection=held / 50, pipe_memory=stats["pipe_memory"],
         pipes_small=stats["pipes_small"], pipes_refused=stats["pipes_refused"])
    relay.stop()
    loop.join(10)
    for s in clients + stalled + [server]:
        s.close()


def idle2000() -> None:
    with Lab(forwarding=True) as lab:  # the default per-client limit
        _, stats, _pid = start(lab)
        lab.spawn(lab.server, sys.executable, PEERS, "echo", "7005")
        wait_for_port(lab, lab.server, 7005)
        started = time.monotonic()
        holder = lab.spawn(lab.client, sys.executable, "-c", HOLD, WAN.peer4, "7005", "2000", "600")
        line = until(lambda: "held" in lab.log_of(holder) and lab.log_of(holder))
        emit(figure="idle2000-default-limit", client=line.split(" at ")[0],
             seconds=round(time.monotonic() - started, 2), active=read_stats(stats)["active"],
             over_limit=read_stats(stats)["end_tcp_over_limit"])
    for how in ("idle_timeout", "sigterm", "drain"):
        idle2000_cleared(how)


def idle2000_cleared(how: str) -> None:
    with Lab(forwarding=True) as lab:
        proc, stats, pid = start(lab, max_connections_per_client=2000, idle_timeout=5.0)
        lab.spawn(lab.server, sys.executable, PEERS, "echo", "7005")
        wait_for_port(lab, lab.server, 7005)
        holder = lab.spawn(lab.client, sys.executable, "-c", HOLD, WAN.peer4, "7005", "2000",
                           "600")
        until(lambda: "held 2000" in lab.log_of(holder))
        held_at = float(lab.log_of(holder).split(" at ")[1])
        cpu = cpu_seconds(pid)
        started = time.monotonic()
        if how == "idle_timeout":
            until(lambda: read_stats(stats)["active"] == 0)
            emit(figure="idle2000", how=how, idle_timeout=5.0,
                 after_last_connection_s=round(time.time() - held_at, 2),
                 relay_cpu_s=round(cpu_seconds(pid) - cpu, 3),
                 idle_timeouts=read_stats(stats)["end_tcp_idle_timeout"])
            return
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGUSR2)
        proc.wait(timeout=120)
        emit(figure="idle2000", how=how, idle_timeout=5.0,
             seconds_to_exit=round(time.monotonic() - started, 2),
             after_last_connection_s=round(time.time() - held_at, 2),
             ends={k: v for k, v in stopped(lab.log_of(proc)).items()
                   if k.startswith("end_tcp_") and v})


def stopped(log: str) -> dict:
    """The counters the relay logged as it stopped."""
    return json.loads(log.strip().splitlines()[-1].split("stopped: ", 1)[1])


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability")
    p.add_argument("figures", nargs="*", default=["descriptors", "fdlimit", "pipes", "idle2000"])
    for name in p.parse_args().figures:
        {"descriptors": descriptors, "fdlimit": fdlimit, "pipes": pipes,
         "idle2000": idle2000}[name]()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
