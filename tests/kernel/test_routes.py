"""Routes and upstream proxies through the real kernel path, with real proxies from Debian:
dante-server and microsocks (SOCKS5), tinyproxy (HTTP CONNECT). They run in a fourth namespace,
`p` (198.18.3.2, 2001:db8:3::2), hung off the gateway; the server's http.server log says who
connected to it: the upstream's address through a proxy, the client's own on a direct route.
Every proxy is started by the test with its own config in the lab's temp dir (never a system
service, never a system account) and killed with the lab."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.conftest import CURL_RESET, Tproxy
from tproxyd.relay.loop import read_stats

pytestmark = pytest.mark.kernel

P4, P6, GW_P4, GW_P6 = "198.18.3.2", "2001:db8:3::2", "198.18.3.1", "2001:db8:3::1"


class Net(NamedTuple):
    lab: Lab
    proxy_ns: str
    web: subprocess.Popen  # http.server on the server, port 8080 (8081 too: `direct`)


@pytest.fixture
def net(lab: Lab) -> Net:
    return proxy_net(lab)


def proxy_net(lab: Lab) -> Net:
    """The lab plus namespace p, routed through the gateway (not captured: only lan0 is)."""
    ns = lab.gw[: -len("-gw")] + "-p"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lab.created.append(ns)  # removed with the lab, also when the test fails
    lab.ip(ns, "link", "set", "lo", "up")
    lab.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
    lab.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
    subprocess.run(["ip", "-n", lab.gw, "link", "add", "px0", "type", "veth", "peer", "name",
                    "eth0", "netns", ns], check=True)
    lab.ip(lab.gw, "addr", "add", f"{GW_P4}/24", "dev", "px0")
    lab.ip(lab.gw, "-6", "addr", "add", f"{GW_P6}/64", "dev", "px0", "nodad")
    lab.ip(ns, "addr", "add", f"{P4}/24", "dev", "eth0")
    lab.ip(ns, "-6", "addr", "add", f"{P6}/64", "dev", "eth0", "nodad")
    lab.ip(lab.gw, "link", "set", "px0", "up")
    lab.ip(ns, "link", "set", "eth0", "up")
    lab.ip(ns, "route", "add", "default", "via", GW_P4)
    lab.ip(ns, "-6", "route", "add", "default", "via", GW_P6)
    web = lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
                    "--directory", lab.tmp, "8080")
    lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
              "--directory", lab.tmp, "8081")
    wait_for_port(lab, lab.server, 8080)
    wait_for_port(lab, lab.server, 8081)
    return Net(lab, ns, web)


def need(program: str) -> None:
    if not shutil.which(program):
        pytest.skip(f"{program} is not installed (sh .ci/setup installs it)")


def start_relay(lab: Lab, upstreams: str, routes: str, protocols: str = '["tcp"]',
                extra: str = "", relay: str = "") -> str:
    """Apply a config capturing TCP (and what protocols says) to the server network, with
    these [[upstream]] and [[route]] tables, and start the relay; returns its stats socket.
    relay: more [relay] keys, one a line."""
    config = lab.write_config(lab.config(
        extra=extra + "[relay]\nspoof_source = true\n" + relay,
        destinations='["198.18.2.0/24", "2001:db8:2::/64"]', protocols=protocols)
        + upstreams + routes)
    Tproxy(lab, config)("apply", check=True)
    lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.relay", "-c", config)
    wait_for_port(lab, lab.gw, 12345)
    if "udp" in protocols:
        wait_for_port(lab, lab.gw, 12345, "udp")
    return f"{lab.tmp}/state/relay.sock"


def upstream(name: str, kind: str, address: str, **keys) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'[[upstream]]\nname = "{name}"\ntype = "{kind}"\naddress = "{address}"\n{body}'


def route(name: str, via: list[str], **keys) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'[[route]]\nname = "{name}"\nvia = {json.dumps(via)}\n{body}'


def get(lab: Lab, family: int, port: int) -> subprocess.CompletedProcess:
    host = WAN.peer4 if family == 4 else f"[{WAN.peer6}]"
    return lab.run(lab.client, "curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w",
                   "%{http_code}", f"http://{host}:{port}/", check=False)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0 and result.stdout == "200", result


def assert_reset(result: subprocess.CompletedProcess) -> None:
    """curl saw its connection reset (tests/conftest.py: CURL_RESET)."""
    assert result.returncode in CURL_RESET, result


def peers_seen(net: Net) -> list[str]:
    """Who connected to port 8080, in order (http.server on :: logs IPv4 peers as ::ffff:a.b.c.d)."""
    return [line.split(" - - ")[0].removeprefix("::ffff:")
            for line in net.lab.log_of(net.web).splitlines() if " - - " in line]


def dante(lab: Lab, ns: str, port: int = 1080, log: bool = False) -> subprocess.Popen:
    """dante-server; with log, each CONNECT (and the name it was asked for) goes to its stderr."""
    need("danted")
    rule = "\n    log: connect\n" if log else ""
    conf = lab.write_config(f"""logoutput: stderr
internal: 0.0.0.0 port = {port}
external: eth0
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate{rule} }}
socks pass {{ from: 0.0.0.0/0 to: ::/0 command: connect udpassociate{rule} }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: udpreply }}
""", f"danted{port}.conf")
    proc = lab.spawn(ns, "danted", "-f", conf)
    wait_for_port(lab, ns, port)
    return proc


def microsocks(lab: Lab, ns: str, port: int, *auth: str) -> subprocess.Popen:
    need("microsocks")
    proc = lab.spawn(ns, "microsocks", "-i", "0.0.0.0", "-p", str(port), *auth)
    wait_for_port(lab, ns, port)
    return proc


def password_file(lab: Lab, name: str, secret: str) -> str:
    path = os.path.join(lab.tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def wait_stats(stats: str, predicate, what: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counters = read_stats(stats)
        if predicate(counters):
            return counters
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {counters}")
        time.sleep(0.1)


@pytest.mark.parametrize("family", [4, 6])
def test_dante_carries_a_routed_connection_and_the_server_sees_the_upstream(net: Net, family):
    lab = net.lab
    dante(lab, net.proxy_ns)
    stats = start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", check_interval=0),
                        route("proxied", ["dante"], ports=[8080]))
    assert_ok(get(lab, family, 8080))  # routed through dante
    assert_ok(get(lab, family, 8081))  # no route matches: direct, the client's address kept
    seen = peers_seen(net)
    assert seen == [P4 if family == 4 else P6]  # dante's external address, not the client's
    direct_log = "".join(lab.log_of(p) for p in lab.procs if p is not net.web)
    assert f"{LAN.peer4 if family == 4 else LAN.peer6} - - " in direct_log
    counters = read_stats(stats)
    assert counters["route_proxied_connections"] == 1
    assert counters["upstream_dante_connections"] == 1 and counters["upstream_dante_up"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_megabytes_cross_byte_exact_through_dante(net: Net, family):
    lab = net.lab
    body = os.urandom(8 << 20)
    with open(os.path.join(lab.tmp, "body"), "wb") as f:
        f.write(body)
    dante(lab, net.proxy_ns)
    start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", check_interval=0),
                route("all", ["dante"]))
    host = WAN.peer4 if family == 4 else f"[{WAN.peer6}]"
    got = lab.run(lab.client, "sh", "-c", f"curl -sS --max-time 60 http://{host}:8080/body"
                                          " | sha256sum").stdout.split()[0]
    assert got == hashlib.sha256(body).hexdigest()
    assert peers_seen(net) == [P4 if family == 4 else P6]


def test_an_upstream_reached_over_ipv6(net: Net):
    lab = net.lab
    need("microsocks")
    lab.spawn(net.proxy_ns, "microsocks", "-i", P6, "-p", "1084")
    wait_for_port(lab, net.proxy_ns, 1084)
    stats = start_relay(lab, upstream("v6", "socks5", f"[{P6}]:1084", check_interval=0),
                        route("all", ["v6"]))
    assert_ok(get(lab, 4, 8080))
    assert_ok(get(lab, 6, 8080))
    assert peers_seen(net) == [P4, P6]  # microsocks leaves by the destination's family
    assert read_stats(stats)["upstream_v6_connections"] == 2


def test_microsocks_with_username_and_password_and_a_wrong_password(net: Net):
    lab = net.lab
    microsocks(lab, net.proxy_ns, 1081, "-u", "alice", "-P", "s3cret")
    good = password_file(lab, "good.pw", "s3cret")
    bad = password_file(lab, "bad.pw", "wrong")
    stats = start_relay(
        lab,
        upstream("ms", "socks5", f"{P4}:1081", username="alice", password_file=good,
                 check_interval=0)
        + upstream("msbad", "socks5", f"{P4}:1081", username="alice", password_file=bad,
                   check_interval=0),
        route("good", ["ms"], ports=[8080], sources=[f"{LAN.peer4}/32"])
        + route("bad", ["msbad"], ports=[8080]))
    assert_ok(get(lab, 4, 8080))
    assert peers_seen(net) == [P4]
    assert_reset(get(lab, 6, 8080))  # from the client's v6 address: the wrong password's route
    counters = read_stats(stats)
    assert counters["upstream_ms_connections"] == 1
    assert counters["upstream_msbad_failures"] == 1 and counters["end_tcp_upstream_error"] == 1


def test_tinyproxy_http_connect_with_basic_auth(net: Net):
    need("tinyproxy")
    lab = net.lab
    conf = lab.write_config(f"Port 3128\nListen {P4}\nBasicAuth bob pw\nMaxClients 10\n"
                            f"PidFile \"{lab.tmp}/tinyproxy.pid\"\n", "tinyproxy.conf")
    lab.spawn(net.proxy_ns, "tinyproxy", "-d", "-c", conf)
    wait_for_port(lab, net.proxy_ns, 3128)
    pw = password_file(lab, "tiny.pw", "pw")
    stats = start_relay(lab, upstream("tiny", "http", f"{P4}:3128", username="bob",
                                      password_file=pw, check_interval=0),
                        route("web", ["tiny"]))
    assert_ok(get(lab, 4, 8080))
    assert_ok(get(lab, 6, 8080))
    assert peers_seen(net) == [P4, P6]
    assert read_stats(stats)["upstream_tiny_connections"] == 2


def test_failover_to_the_second_upstream_and_back_when_the_first_returns(net: Net):
    lab = net.lab
    dante(lab, net.proxy_ns, 1080)
    # "first" is dead at the start (nothing on port 1082); checks every second notice its return
    stats = start_relay(lab, upstream("first", "socks5", f"{P4}:1082", check_interval=1)
                        + upstream("second", "socks5", f"{P4}:1080", check_interval=0),
                        route("r", ["first", "second"]))
    assert_ok(get(lab, 4, 8080))
    counters = read_stats(stats)
    assert counters["upstream_second_connections"] == 1 and counters["upstream_first_up"] == 0
    microsocks(lab, net.proxy_ns, 1082)
    wait_stats(stats, lambda c: c["upstream_first_up"] == 1, "first to be trusted again")
    assert_ok(get(lab, 4, 8080))
    counters = read_stats(stats)
    assert counters["upstream_first_connections"] == 1 and counters["upstream_second_connections"] == 1
    assert peers_seen(net) == [P4, P4]


def test_every_upstream_dead_resets_the_client_quickly_and_counts_upstream_error(net: Net):
    lab = net.lab
    stats = start_relay(lab, upstream("a", "socks5", f"{P4}:1090", check_interval=0)
                        + upstream("b", "socks5", f"{P4}:1091", check_interval=0),
                        route("r", ["a", "b"]))
    started = time.monotonic()
    assert_reset(get(lab, 4, 8080))
    assert time.monotonic() - started < 10  # a reset, not curl's 20 s timeout
    counters = read_stats(stats)
    assert counters["end_tcp_upstream_error"] == 1
    assert counters["upstream_a_failures"] == counters["upstream_b_failures"] == 1
    assert peers_seen(net) == []


def test_a_reject_route_resets_and_the_rest_goes_direct(net: Net):
    lab = net.lab
    stats = start_relay(lab, "", route("blocked", ["reject"], ports=[8080]))
    assert_reset(get(lab, 4, 8080))
    assert_reset(get(lab, 6, 8080))
    assert_ok(get(lab, 4, 8081))
    counters = read_stats(stats)
    assert counters["end_tcp_rejected"] == 2 and counters["route_blocked_connections"] == 2
    assert peers_seen(net) == []


def test_the_access_log_names_the_route_and_the_upstream(net: Net):
    """Issue 14 with issue 12: each line says which route matched and which upstream carried
    it (or was tried last), and why an upstream failed."""
    lab = net.lab
    dante(lab, net.proxy_ns)
    log_path = os.path.join(lab.tmp, "access.log")
    start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", check_interval=0)
                + upstream("dead", "socks5", f"{P4}:1099", check_interval=0),
                route("proxied", ["dante"], ports=[8080]) + route("blocked", ["reject"], ports=[8082])
                + route("broken", ["dead"], ports=[8083]),
                extra=f'[log]\naccess = "{log_path}"\n')
    assert_ok(get(lab, 4, 8080))
    assert_ok(get(lab, 4, 8081))
    assert_reset(get(lab, 4, 8082))
    assert_reset(get(lab, 4, 8083))

    def lines() -> dict:
        if not os.path.exists(log_path):
            return {}
        with open(log_path) as f:
            return {int(r["dst"].rsplit(":", 1)[1]): r for r in map(json.loads, f)}

    deadline = time.monotonic() + 15
    while len(lines()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = lines()
    assert (got[8080]["route"], got[8080]["via"]) == ("proxied", "dante")
    assert got[8080]["end"] in ("client_fin", "server_fin") and got[8080]["bytes_down"] > 0
    assert got[8080]["connect_ms"] is not None
    assert (got[8081]["route"], got[8081]["via"]) == ("direct", "direct")
    assert (got[8082]["route"], got[8082]["via"], got[8082]["end"]) == ("blocked", "reject", "rejected")
    assert (got[8083]["route"], got[8083]["via"], got[8083]["end"]) == ("broken", "dead", "upstream_error")
    assert "dead" in got[8083]["error"]


HOSTILE = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[2])))
while True:
    c, _ = s.accept()
    c.recv(64)
    if sys.argv[1] == "garbage":
        c.sendall(b"SSH-2.0-OpenSSH_9.2\\r\\n" * 20)
    else:
        c.sendall(b"\\x05")  # half a method choice, then gone
    c.close()
"""


@pytest.mark.parametrize("behaviour", ["garbage", "close"])
def test_a_hostile_upstream_costs_one_clean_reset_and_the_relay_lives_on(net: Net, behaviour):
    lab = net.lab
    lab.spawn(net.proxy_ns, sys.executable, "-c", HOSTILE, behaviour, "1095")
    wait_for_port(lab, net.proxy_ns, 1095)
    stats = start_relay(lab, upstream("evil", "socks5", f"{P4}:1095", check_interval=0),
                        route("r", ["evil"], ports=[8080]))
    assert_reset(get(lab, 4, 8080))
    assert_ok(get(lab, 4, 8081))  # the relay lives on
    counters = read_stats(stats)
    assert counters["upstream_evil_failures"] == 1 and counters["end_tcp_upstream_error"] == 1
    assert counters["internal_errors"] == 0


def dnsmasq(lab: Lab, port: int) -> subprocess.Popen:
    proc = lab.spawn(lab.server, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
                     "--log-queries", "--no-resolv", "--no-hosts", "--user=root", f"--port={port}",
                     "--address=/example.test/198.18.2.50", "--bind-interfaces",
                     f"--listen-address={WAN.peer4}")
    wait_for_port(lab, lab.server, port, "udp")
    return proc


def dig(lab: Lab, port: int, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.client, "dig", "+short", "+timeout=1", "+tries=1", "-p", str(port), *args,
                   f"@{WAN.peer4}", "A", "example.test", check=False)


def test_udp_on_a_reject_route_is_dropped_and_counted_and_other_udp_goes_direct(net: Net):
    lab = net.lab
    dnsmasq(lab, 53)
    dnsmasq(lab, 5353)
    stats = start_relay(lab, "", route("nodns", ["reject"], ports=[53]), '["tcp", "udp"]')
    assert "198.18.2.50" not in dig(lab, 53).stdout  # dropped: dig times out
    assert dig(lab, 5353).stdout.strip() == "198.18.2.50"
    counters = read_stats(stats)
    assert counters["end_udp_rejected"] >= 1 and counters["route_nodns_connections"] >= 1
    assert counters["udp_sessions_opened"] == 1


def test_the_daemon_reloads_changed_routes_into_its_workers_and_status_shows_upstreams(net: Net):
    from tests.kernel.test_daemon import Tproxyd, eventually

    lab = net.lab
    dante(lab, net.proxy_ns)
    base = lab.config(destinations='["198.18.2.0/24", "2001:db8:2::/64"]', protocols='["tcp"]')
    ups = upstream("dante", "socks5", f"{P4}:1080", check_interval=1)
    d = Tproxyd(lab, base + ups + route("r", ["reject"], ports=[8080]))
    assert_reset(get(lab, 4, 8080))
    d.save(base + ups + route("r", ["dante"], ports=[8080]))
    # the new workers take new connections once the reload is done; the old ones drain
    eventually(lambda: get(lab, 4, 8080).stdout == "200", "the route through dante", timeout=20,
               step=0.2)
    assert peers_seen(net) == [P4]

    def status_with_upstream() -> str | None:
        out = d.tproxy("status").stdout
        return out if "upstream dante" in out else None

    out = eventually(status_with_upstream, "status to list the upstream", timeout=10, step=0.5)
    assert f"upstream dante (socks5 {P4}:1080): up;" in out, out
    assert "route r: " in out
    assert d.stop() == 0


def test_udp_through_dante_udp_associate_reaches_dns_from_the_upstreams_address(net: Net):
    lab = net.lab
    dante(lab, net.proxy_ns)
    dns = dnsmasq(lab, 53)
    stats = start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", udp=True, check_interval=0),
                        route("dns", ["dante"], ports=[53]), '["tcp", "udp"]')
    same_port = ("-b", f"{LAN.peer4}#5300")  # both queries in one session
    assert dig(lab, 53, *same_port).stdout.strip() == "198.18.2.50"  # from the address it asked
    assert dig(lab, 53, *same_port).stdout.strip() == "198.18.2.50"
    log = lab.log_of(dns)
    assert f"from {P4}" in log and f"from {LAN.peer4}" not in log, log
    counters = read_stats(stats)
    assert counters["upstream_dante_connections"] == 1  # one association for both queries
    # dante reaches the server through this gateway, by an interface not intercepted: its
    # datagrams are forwarded, not captured, although the relay answers the client from a
    # socket bound to that very server address (the ruleset's socket lookups outside
    # intercepted interfaces find only the relay's outbound sockets)
    assert counters["udp_sessions"] == 1 and counters["route_dns_connections"] == 1
    assert counters["udp_datagrams_down"] == 2 and counters["end_udp_loop"] == 0


def test_udp_with_its_upstream_dead_is_dropped_and_counted(net: Net):
    lab = net.lab
    dnsmasq(lab, 53)
    stats = start_relay(lab, upstream("gone", "socks5", f"{P4}:1099", udp=True, check_interval=0),
                        route("dns", ["gone"], ports=[53]), '["tcp", "udp"]')
    assert "198.18.2.50" not in dig(lab, 53).stdout
    counters = read_stats(stats)
    assert counters["end_udp_upstream_error"] >= 1 and counters["upstream_gone_failures"] == 1
    assert counters["udp_sessions"] == 0


def test_udp_fails_over_to_the_second_upstream(net: Net):
    lab = net.lab
    dante(lab, net.proxy_ns)
    dnsmasq(lab, 53)
    stats = start_relay(lab, upstream("gone", "socks5", f"{P4}:1099", udp=True, check_interval=0)
                        + upstream("dante", "socks5", f"{P4}:1080", udp=True, check_interval=0),
                        route("dns", ["gone", "dante"], ports=[53]), '["tcp", "udp"]')
    assert dig(lab, 53).stdout.strip() == "198.18.2.50"
    counters = read_stats(stats)
    assert counters["upstream_gone_failures"] == 1 and counters["upstream_dante_connections"] == 1


SILENT = """
import socket, sys, time
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
held = []
while True:
    c, _ = s.accept()
    held.append(c)  # reads nothing, answers nothing: a handshake that never ends
"""

RESET_AFTER = """
import socket, struct, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
time.sleep(float(sys.argv[3]))
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
print("reset", flush=True)
"""


def test_a_client_reset_during_the_upstream_handshake_frees_its_slot_at_once(net: Net):
    """The upstream takes the connection and never answers the greeting; the client gives up
    with a reset. The relay lets go of it then, not when connect_timeout (60 s) passes."""
    lab = net.lab
    lab.spawn(net.proxy_ns, sys.executable, "-c", SILENT, "1096")
    wait_for_port(lab, net.proxy_ns, 1096)
    log_path = os.path.join(lab.tmp, "access.log")
    stats = start_relay(lab, upstream("mute", "socks5", f"{P4}:1096", check_interval=0,
                                      connect_timeout=60),
                        route("r", ["mute"], ports=[8080]),
                        extra=f'[log]\naccess = "{log_path}"\n')
    client = lab.spawn(lab.client, sys.executable, "-c", RESET_AFTER, WAN.peer4, "8080", "2")
    wait_stats(stats, lambda c: c["active"] == 1, "the connection in the handshake")
    assert client.wait(20) == 0, lab.log_of(client)
    reset_at = time.monotonic()
    counters = wait_stats(stats, lambda c: c["active"] == 0, "the relay to let go", timeout=15)
    assert time.monotonic() - reset_at < 15  # well before the upstream's connect_timeout
    assert counters["end_tcp_client_reset"] == 1 and counters["end_tcp_connect_timeout"] == 0
    assert counters["upstream_mute_failures"] == 0  # the client left: not the upstream's fault
    deadline = time.monotonic() + 10
    while not (os.path.exists(log_path) and os.path.getsize(log_path)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(log_path) as f:
        (line,) = map(json.loads, f)
    assert (line["route"], line["via"], line["end"]) == ("r", "mute", "client_reset")
    assert peers_seen(net) == []
