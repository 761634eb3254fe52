"""A lab of network namespaces: client -- gateway -- server, for tests, the demo and benchmarks.

Only the namespaces it creates are touched (unique names, removed on exit, also on failure or
Ctrl-C); the machine's own namespace never sees a rule, route, table or sysctl. Addresses come
from the benchmarking ranges 198.18.0.0/15 and 2001:db8::/32.

    python -m tproxyd.reconciler.lab demo      # the README's main job
    python -m tproxyd.reconciler.lab listen PORT   # a transparent listener (inside a namespace)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

PREFIX = "tpx"


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


# --- a transparent listener: what the relay will be, reduced to reporting addresses ----------------

def listen(port: int) -> None:
    """Accept TCP connections for any address on port (IPv4 and IPv6, IP_TRANSPARENT) and answer
    each HTTP request with the original destination (getsockname) and the client (getpeername)."""
    import selectors

    from tproxyd.relay.listeners import open_listeners

    sel = selectors.DefaultSelector()
    for s in open_listeners(port, ("0.0.0.0", "::"), transparent=True, udp=False):
        sel.register(s, selectors.EVENT_READ)
    print(f"listening on port {port}", flush=True)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    local = conn.getsockname()
                    body = f"original-destination {local[0]} {local[1]}\nclient {peer[0]} {peer[1]}\n"
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
                    print(body.replace("\n", "; "), flush=True)
                except OSError as exc:
                    print(f"connection from {peer}: {exc}", flush=True)


# --- the README's main job -----------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "tproxy.toml.example")


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
    from tproxyd.reconciler.daemon import query

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


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the demo as Ctrl-C does: through the `with Lab()` teardown."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args[:1] == ["listen"] and len(args) == 2:
        listen(int(args[1]))
        return 0
    if args[:1] in (["demo"], []):
        if os.geteuid() != 0:
            print("the lab needs root (it creates network namespaces)", file=sys.stderr)
            return 1
        try:
            return demo()
        except KeyboardInterrupt:
            print("\ninterrupted: the lab was removed", file=sys.stderr)
            return 130
    print("usage: python -m tproxyd.reconciler.lab [demo | listen PORT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
