"""Namespaces for a lab: client -- gateway -- server, for tests, the demo and benchmarks.

Only the namespaces it creates are touched (unique names, removed on exit, also on failure or
Ctrl-C), and a sweep removes those a killed earlier run left; the machine's own namespace never
sees a rule, route, table or sysctl. Addresses come from the benchmarking ranges 198.18.0.0/15
and 2001:db8::/32.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List

PREFIX = "tpx"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout holding lab/


@dataclass(frozen=True)
class Side:
    """One veth link: the gateway's end and the peer's end."""

    gw_if: str
    peer_if: str
    gw4: str
    peer4: str
    gw6: str
    peer6: str


LAN = Side("lan0", "eth0", "198.18.1.1", "198.18.1.2", "2001:db8:1::1", "2001:db8:1::2")
WAN = Side("wan0", "eth0", "198.18.2.1", "198.18.2.2", "2001:db8:2::1", "2001:db8:2::2")


def _sh(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None,
        env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, text=True, input=input,
                          capture_output=True, env=env)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> List[str]:
    """Remove lab namespaces left by processes that no longer exist (a killed earlier run)."""
    removed = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "x" not in name:
            continue
        pid_text = name[len(PREFIX):].split("x", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            _sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


class Lab:
    """client (eth0) -- (lan0) gw (wan0) -- (eth0) server, IPv4 and IPv6, routed through gw."""

    def __init__(self, forwarding: bool = False):
        tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.client, self.gw, self.server = f"{tag}-c", f"{tag}-gw", f"{tag}-s"
        self.forwarding = forwarding
        self.procs: List[subprocess.Popen] = []
        self.logs: Dict[int, str] = {}
        self.created: List[str] = []
        self.tmp = tempfile.mkdtemp(prefix=f"{tag}-")
        # what runs inside keeps its rendered-config cache here, not in the host's /run/tproxyd
        self.env = {**os.environ, "TPROXYD_CACHE_DIR": os.path.join(self.tmp, "cache")}

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        sweep_stale()
        for ns in (self.client, self.gw, self.server):
            _sh("ip", "netns", "add", ns)
            self.created.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
            # No duplicate address detection: link-local addresses usable at once, so the
            # first IPv6 neighbour discovery does not wait out a tentative address (~1 s).
            for scope in ("all", "default"):
                self.sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", "0")
        for side, peer in ((LAN, self.client), (WAN, self.server)):
            # Created directly inside the namespaces: names never meet the host's own interfaces.
            _sh("ip", "-n", self.gw, "link", "add", side.gw_if, "type", "veth",
                "peer", "name", side.peer_if, "netns", peer)
            self.ip(self.gw, "addr", "add", f"{side.gw4}/24", "dev", side.gw_if)
            self.ip(self.gw, "-6", "addr", "add", f"{side.gw6}/64", "dev", side.gw_if, "nodad")
            self.ip(peer, "addr", "add", f"{side.peer4}/24", "dev", side.peer_if)
            self.ip(peer, "-6", "addr", "add", f"{side.peer6}/64", "dev", side.peer_if, "nodad")
            self.ip(self.gw, "link", "set", side.gw_if, "up")
            self.ip(peer, "link", "set", side.peer_if, "up")
            self.ip(peer, "route", "add", "default", "via", side.gw4)
            self.ip(peer, "-6", "route", "add", "default", "via", side.gw6)
        if self.forwarding:
            self.sysctl(self.gw, "net.ipv4.ip_forward", "1")
            self.sysctl(self.gw, "net.ipv6.conf.all.forwarding", "1")

    def down(self) -> None:
        """Stop what the lab started and remove its namespaces. Runs once, never raises."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        for ns in self.created:
            _sh("ip", "netns", "del", ns, check=False)
        self.created.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- running things inside ---------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> subprocess.CompletedProcess:
        return _sh("ip", "-n", ns, *args)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout, input=input,
                   env=self.env)

    def spawn(self, ns: str, *cmd: str, env: Dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running program in ns. Its output goes to a log file (a pipe nobody
        reads would block it): read it with log_of()."""
        log_path = os.path.join(self.tmp, f"proc{len(self.procs)}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log,
                                    stderr=subprocess.STDOUT, text=True,
                                    env={**self.env, **(env or {})})
        self.procs.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def spawn_listener(self, ns: str, port: int) -> subprocess.Popen:
        """`python -m lab listen PORT` in ns (lab is importable from the checkout only)."""
        return self.spawn(ns, sys.executable, "-m", "lab", "listen", str(port),
                          env={"PYTHONPATH": ROOT})

    def log_of(self, proc: subprocess.Popen) -> str:
        with open(self.logs[proc.pid]) as f:
            return f.read()

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> int:
        """SIGTERM one program this lab started, and wait for it."""
        if proc.poll() is None:
            proc.terminate()
        return proc.wait(timeout=timeout)

    def write_config(self, text: str, name: str = "tproxy.toml") -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, extra: str = "", **intercept: str) -> str:
        """A tproxy.toml for this lab: capture what enters lan0; state kept in the lab's tmp dir."""
        fields = {"name": '"lan"', "interfaces": '["lan0"]', **intercept}
        body = "\n".join(f"{k} = {v}" for k, v in fields.items())
        return (f'[daemon]\nstate_dir = "{self.tmp}/state"\n{extra}\n'
                f"[[intercept]]\n{body}\n")


def wait_for_port(lab: Lab, ns: str, port: int, proto: str = "tcp", timeout: float = 10) -> None:
    """Poll `ss` inside ns until something listens on port."""
    deadline = time.monotonic() + timeout
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    while time.monotonic() < deadline:
        out = lab.run(ns, "ss", flag, f"sport = :{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {proto} port {port} in {ns}")


def run_own_lab(cmd: list[str], timeout: float, **kwargs) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a command that builds its own lab; return its result and the namespaces of that
    lab still present afterwards (named after the command's pid, so other labs running at the
    same time do not count)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines()
            if line.startswith(f"{PREFIX}{proc.pid}x")]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), left
