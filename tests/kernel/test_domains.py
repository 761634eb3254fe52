"""Routes by name (issue 13) through the real kernel path, with real programs: curl from the
client to an HTTPS server (Python's ssl, a certificate made by openssl for the test's names)
and to an HTTP server, by name with `--resolve`; dante-server from Debian as the upstream in
namespace p (see test_routes.py). The server's log says who connected: dante's address on a
`domains` route through it, the client's own on a direct one. dante resolves the names the relay
hands it (send_domain) from p's own hosts file, /etc/netns/P/hosts (`ip netns exec` mounts it
over /etc/hosts). The proof that the upstream got the name and not the address: the client's
DNS answer is wrong (curl --resolve to an address where nothing answers, NOWHERE) and the page
still comes, from the address dante looked up; without send_domain the same request fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tests.kernel.test_relay_limits import wait_until
from tests.kernel.test_routes import P4, Net, dante, need, proxy_net, route, start_relay, upstream
from tproxyd.relay import sniff_quic
from tproxyd.relay.loop import read_stats

NEEDS_QUIC_KEYS = pytest.mark.skipif(
    not sniff_quic.AVAILABLE, reason="python3-cryptography is not installed: QUIC routes without a name")

pytestmark = pytest.mark.kernel

DATA = Path(__file__).resolve().parents[1] / "data" / "tls"
NAMES = ("www.corp.example", "other.example", "ads.example", "big.example.net", "quic.example.com")
NOWHERE = "198.18.2.99"  # captured (the server's network), but no host has it
SERVER_LOG = "peer "  # what the HTTPS server prints per request: "peer ADDR NAME"


class Named(NamedTuple):
    net: Net
    dante: subprocess.Popen
    https: subprocess.Popen
    stats: str


HTTPS_SERVER = textwrap.dedent("""
    import http.server, socket, ssl, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            host = self.client_address[0].removeprefix("::ffff:")
            print("peer", host, self.headers.get("Host"), flush=True)
            body = b"hello " + host.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    server = Server(("::", port), Handler)
    if cert != "-":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
""")


def certificate(lab: Lab) -> tuple[str, str]:
    """A self-signed certificate for every name the tests ask for; curl trusts it (--cacert)."""
    cert, key = os.path.join(lab.tmp, "cert.pem"), os.path.join(lab.tmp, "key.pem")
    sans = ",".join(f"DNS:{n}" for n in NAMES)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=tproxyd test", "-addext", f"subjectAltName={sans}"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def net(lab: Lab) -> Net:
    return proxy_net(lab)


@pytest.fixture
def hosts(net: Net) -> Iterator[None]:
    """p resolves the test's names to the server (dante asks its own resolver, as a real
    upstream would); the folder is removed afterwards, also when the test fails."""
    folder = f"/etc/netns/{net.proxy_ns}"
    os.makedirs(folder)
    try:
        with open(f"{folder}/hosts", "w") as f:
            f.write("".join(f"{WAN.peer4} {name}\n" for name in NAMES))
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


ROUTES = (route("corp", ["dante"], domains=["corp.example", "big.example.net"])
          + route("ads", ["reject"], domains=["ads.example"]))


def start_named(net: Net, routes: str = ROUTES, extra: str = "") -> Named:
    lab = net.lab
    need("openssl")
    cert, key = certificate(lab)
    script = lab.write_config(HTTPS_SERVER, "https_server.py")
    https = lab.spawn(lab.server, sys.executable, script, cert, key, "443")
    wait_for_port(lab, lab.server, 443)
    proxy = dante(lab, net.proxy_ns, log=True)
    stats = start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", check_interval=0), routes,
                        extra=extra)
    return Named(net, proxy, https, stats)


def curl(lab: Lab, url: str, name: str, port: int, *extra: str,
         address: str = WAN.peer4) -> subprocess.CompletedProcess:
    return lab.run(lab.client, "curl", "-sS", "--max-time", "20", "--resolve",
                   f"{name}:{port}:{address}", *extra, url, check=False)


def https(named: Named, name: str, address: str = WAN.peer4) -> subprocess.CompletedProcess:
    lab = named.net.lab
    return curl(lab, f"https://{name}/", name, 443, "--cacert", os.path.join(lab.tmp, "cert.pem"),
                address=address)


def served(named: Named) -> list[str]:
    """'ADDR HOST' per request the HTTPS server answered, in order."""
    return [line[len(SERVER_LOG):] for line in named.net.lab.log_of(named.https).splitlines()
            if line.startswith(SERVER_LOG)]


def test_https_by_name_through_dante_with_the_name_direct_and_rejected(net: Net, hosts):
    lab = net.lab
    log = os.path.join(lab.tmp, "access.log")
    named = start_named(net, extra=f'[log]\naccess = "{log}"\n')
    # the client's DNS answer is wrong; dante, given the name, finds the server: its address
    got = https(named, "www.corp.example", address=NOWHERE)
    assert got.returncode == 0 and got.stdout == f"hello {P4}", got
    assert f"{WAN.peer4}.443" in lab.log_of(named.dante)  # what dante resolved and reached
    got = https(named, "other.example")
    assert got.returncode == 0 and got.stdout == f"hello {LAN.peer4}", got  # direct: the client
    got = https(named, "ads.example")
    # reset after its ClientHello: curl says so during the TLS handshake (35) or reading (56)
    assert got.returncode in (35, 56) and "reset" in got.stderr.lower(), got
    assert served(named) == [f"{P4} www.corp.example", f"{LAN.peer4} other.example"]
    counters = read_stats(named.stats)
    assert counters["route_corp_connections"] == 1 and counters["route_ads_connections"] == 1
    assert counters["upstream_dante_connections"] == 1 and counters["end_tcp_rejected"] == 1
    with open(log) as f:
        lines = [json.loads(line) for line in f]
    assert sorted((d.get("domain"), d["route"], d["via"], d["end"] == "rejected")
                  for d in lines) == [("ads.example", "ads", "reject", True),
                                      ("other.example", "direct", "direct", False),
                                      ("www.corp.example", "corp", "dante", False)]


def test_without_send_domain_dante_gets_the_address_the_client_asked_for(net: Net, hosts):
    lab = net.lab
    need("openssl")
    certificate(lab)
    dante(lab, net.proxy_ns, log=True)
    stats = start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", check_interval=0,
                                      send_domain=False),
                        route("corp", ["dante"], domains=["corp.example"]), extra="")
    got = curl(lab, "https://www.corp.example/", "www.corp.example", 443, "-k", address=NOWHERE)
    assert got.returncode != 0, got  # dante tried NOWHERE, as told
    counters = read_stats(stats)
    assert counters["route_corp_connections"] == 1 and counters["end_tcp_upstream_error"] == 1


def test_plain_http_by_host(net: Net, hosts):
    named = start_named(net)
    lab = net.lab
    script = os.path.join(lab.tmp, "https_server.py")
    web = lab.spawn(lab.server, sys.executable, script, "-", "-", "8088")
    wait_for_port(lab, lab.server, 8088)
    for name, who, address in (("www.corp.example", P4, NOWHERE),
                               ("other.example", LAN.peer4, WAN.peer4)):
        got = curl(lab, f"http://{name}:8088/", name, 8088, address=address)
        assert got.returncode == 0 and got.stdout == f"hello {who}", got
    got = curl(lab, "http://ads.example:8088/", "ads.example", 8088)
    assert got.returncode == 56, got  # reset: its request was read, never answered
    assert [line for line in lab.log_of(web).splitlines() if line.startswith(SERVER_LOG)] == [
        f"{SERVER_LOG}{P4} www.corp.example:8088", f"{SERVER_LOG}{LAN.peer4} other.example:8088"]
    assert f"{WAN.peer4}.8088" in lab.log_of(named.dante)  # dante resolved the Host


SERVER_FIRST = textwrap.dedent("""
    import socket, sys
    s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    while True:
        conn, peer = s.accept()
        conn.sendall(b"220 smtp.example ESMTP\\r\\n")
        conn.close()
""")

TIME_BANNER = textwrap.dedent("""
    import socket, sys, time
    started = time.monotonic()
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
        banner = c.recv(100)
    print(round(time.monotonic() - started, 3), banner.decode().strip())
""")


def test_a_server_first_protocol_works_delayed_by_at_most_about_the_sniff_timeout(net: Net):
    lab = net.lab
    server = lab.write_config(SERVER_FIRST, "smtp.py")
    lab.spawn(lab.server, sys.executable, server, "2525")
    wait_for_port(lab, lab.server, 2525)
    stats = start_relay(lab, "", route("ads", ["reject"], domains=["ads.example"]))
    client = lab.write_config(TIME_BANNER, "banner.py")
    took, banner = lab.run(lab.client, sys.executable, client, WAN.peer4, "2525").stdout.split(" ", 1)
    assert banner.strip() == "220 smtp.example ESMTP"
    # it waited for a name (sniff_timeout, 0.3 s), then went direct; the rest is a loaded
    # machine's slack
    assert 0.25 <= float(took) < 5.0
    counters = read_stats(stats)
    assert counters["route_ads_connections"] == 0 and counters["end_tcp_rejected"] == 0


SEGMENTS = textwrap.dedent("""
    import socket, sys, time
    hello = open(sys.argv[3], "rb").read()
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(hello), 50):
            c.send(hello[i:i + 50])
            time.sleep(0.002)
        c.shutdown(socket.SHUT_WR)
        print(c.recv(200).decode().strip())
""")


def test_a_clienthello_in_50_byte_segments_is_routed_by_name(net: Net, hosts):
    lab = net.lab
    named = start_named(net)
    digest = lab.spawn(lab.server, sys.executable, str(Path(__file__).with_name("peers.py")),
                       "digest", "4443")
    wait_for_port(lab, lab.server, 4443)
    hello = DATA / "openssl-ffdhe8192-records.bin"  # big.example.net, 1.6 KB in 4 records
    client = lab.write_config(SEGMENTS, "segments.py")
    # to NOWHERE: only dante, given the name, finds the server
    answer = lab.run(lab.client, sys.executable, client, NOWHERE, "4443", str(hello)).stdout
    data = hello.read_bytes()
    assert answer.strip() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"  # unchanged
    assert f"peer {P4} " in lab.log_of(digest) or f"peer ::ffff:{P4} " in lab.log_of(digest)
    assert f"{WAN.peer4}.4443" in lab.log_of(named.dante)


# --- QUIC (UDP 443) -------------------------------------------------------------------------------

UDP_SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 443))
    while True:
        data, peer = s.recvfrom(65536)
        print("udp", peer[0], len(data), flush=True)
        s.sendto(b"ok " + peer[0].encode(), peer)
""")

QUIC_CLIENT = textwrap.dedent("""
    import os, socket, sys, time
    for case in sys.argv[1:]:  # ADDRESS=PATH
        address, path = case.split("=")
        datagrams = [bytes.fromhex(line) for line in open(path).read().split()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a session each
            s.settimeout(2)
            s.connect((address, 443))
            for datagram in datagrams:
                s.send(datagram)
                time.sleep(0.01)
            try:
                answer = s.recv(100).decode()
            except socket.timeout:
                answer = "none"
            print(os.path.basename(path), answer, flush=True)
""")


def quic_datagrams(lab: Lab) -> dict[str, str]:
    """Files of hex datagrams, one a line, for the client to send, by what they are."""
    from tests.unit.test_relay_sniffing import two_initials
    from tests.unit.tlsgen import rfc9001_initial

    recorded = [line for line in (DATA.parent / "quic" / "aioquic-h3.hex").read_text().split()
                if not line.startswith("#") and len(line) > 100]  # quic.example.com
    cases = {"corp": recorded, "late": [d.hex() for d in two_initials(b"late.example.com")],
             "example": [rfc9001_initial().hex()], "notquic": [b"a datagram, not QUIC".hex()]}
    paths = {}
    for case, lines in cases.items():
        paths[case] = lab.write_config("\n".join(lines) + "\n", f"{case}.hex")
    return paths


@NEEDS_QUIC_KEYS
def test_quic_initials_are_routed_by_name(net: Net, hosts):
    from tests.kernel.test_routes import dante

    lab = net.lab
    server = lab.spawn(lab.server, sys.executable, lab.write_config(UDP_SERVER, "udp443.py"))
    wait_for_port(lab, lab.server, 443, "udp")
    dante(lab, net.proxy_ns)
    stats = start_relay(lab, upstream("dante", "socks5", f"{P4}:1080", udp=True, check_interval=0),
                        route("corp", ["dante"], domains=["quic.example.com"])
                        + route("ads", ["reject"], domains=["late.example.com"]),
                        protocols='["tcp", "udp"]')
    paths = quic_datagrams(lab)
    client = lab.write_config(QUIC_CLIENT, "quic_client.py")
    # corp's to NOWHERE: dante, given the name in the datagrams' header, finds the server
    out = lab.run(lab.client, sys.executable, client, f"{NOWHERE}={paths['corp']}",
                  *(f"{WAN.peer4}={paths[c]}" for c in ("late", "example", "notquic"))).stdout
    assert out.splitlines() == [
        f"corp.hex ok {P4}",  # through dante (UDP ASSOCIATE): its address
        "late.hex none",  # the name is in the second datagram: held for it, then rejected
        f"example.hex ok {LAN.peer4}",  # a name no route has: direct
        f"notquic.hex ok {LAN.peer4}"], out  # no name: direct at once
    assert "udp " + LAN.peer4 in lab.log_of(server)
    counters = read_stats(stats)
    assert counters["route_corp_connections"] == 1 and counters["route_ads_connections"] == 1
    assert counters["end_udp_rejected"] == 1


@NEEDS_QUIC_KEYS
def test_a_datagram_held_for_its_name_when_the_relay_drains_still_reaches_its_server(net: Net):
    """A drain (SIGUSR2: a reload's old worker) that found no connection and no session ended
    at once, and dropped a new session's first datagram held while it waited for a name."""
    lab = net.lab
    server = lab.spawn(lab.server, sys.executable, lab.write_config(UDP_SERVER, "udp443.py"))
    wait_for_port(lab, lab.server, 443, "udp")
    stats = start_relay(lab, "", route("ads", ["reject"], domains=["late.example.com"]),
                        protocols='["tcp", "udp"]', relay="sniff_timeout = 2.0\n")
    first = quic_datagrams(lab)["late"]  # the name is in the second datagram, never sent
    with open(first) as f:
        datagram = f.read().split()[0]
    client = lab.spawn(lab.client, sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(8)
        s.connect(({WAN.peer4!r}, 443))
        s.send(bytes.fromhex({datagram!r}))
        print("sent", flush=True)
        print("answer", s.recv(100).decode(), flush=True)
    """))
    wait_until(lambda: "sent" in lab.log_of(client), "the client's datagram")
    wait_until(lambda: read_stats(stats)["udp_held"] == 1, "the datagram held for its name")
    os.kill(read_stats(stats)["pid"], signal.SIGUSR2)
    wait_until(lambda: "answer" in lab.log_of(client), "the server's answer", timeout=10)
    assert f"answer ok {LAN.peer4}" in lab.log_of(client)  # no name: direct, client's address
    assert "udp " + LAN.peer4 in lab.log_of(server)
