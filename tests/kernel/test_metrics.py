"""The daemon's Prometheus endpoint as a scraper sees it: curl inside the gateway's namespace
during real traffic. Totals match the traffic; no counter goes down across a SIGHUP and a
worker's kill -9; promtool finds nothing to say; the endpoint is only where the config says."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from lab import LAN, WAN, Lab, wait_for_port
from tests.kernel.test_daemon import Tproxyd, config, eventually, worker_pids

pytestmark = pytest.mark.kernel
LISTEN = "127.0.0.1:9641"
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
PROMTOOL = os.path.join(os.path.dirname(sys.executable), "promtool")  # .ci/setup puts it there

Samples = dict[tuple[str, tuple], float]


def metrics_config(lab: Lab, listen: str = LISTEN, before: str = "") -> str:
    """before: more lines of [daemon], or sections of their own, ahead of [metrics]."""
    return config(lab, extra=f'{before}[metrics]\nlisten = "{listen}"\n')


def scrape(lab: Lab, where: str = LISTEN, accept: str | None = None, ns: str | None = None
           ) -> tuple[str, str]:
    """(body, content type) of GET /metrics, by curl in the gateway (or ns)."""
    cmd = ["curl", "-sS", "--fail", "--max-time", "5", "-w", "\n%{content_type}",
           f"http://{where}/metrics"]
    if accept:
        cmd += ["-H", f"Accept: {accept}"]
    out = lab.run(ns or lab.gw, *cmd).stdout
    body, _, content_type = out.rpartition("\n")
    return body, content_type


def samples(text: str, kinds: tuple[str, ...] = ("counter", "gauge", "histogram")) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) if fam.type in kinds
            for s in fam.samples}


def counters(lab: Lab) -> Samples:
    """Every sample that may only go up: counters and histograms (buckets, count, sum)."""
    return samples(scrape(lab)[0], ("counter", "histogram"))


def total(got: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in got.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def conn(proto: str, end: str) -> tuple[str, tuple]:
    return ("tproxyd_connections_total",
            (("end", end), ("proto", proto), ("route", "direct"), ("via", "direct")))


def assert_no_decrease(before: Samples, after: Samples, what: str) -> None:
    missing = sorted(set(before) - set(after))
    assert not missing, f"{what}: series gone: {missing[:5]}"
    down = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
    assert not down, f"{what}: counters went down: {down}"


@pytest.fixture
def web(lab: Lab):
    with open(os.path.join(lab.tmp, "who"), "w") as f:
        f.write("the real server\n")
    with open(os.path.join(lab.tmp, "body"), "wb") as f:
        f.write(os.urandom(8 << 20))
    proc = lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
                     "--directory", lab.tmp, "8080")
    wait_for_port(lab, lab.server, 8080)
    return proc


def fetch(lab: Lab) -> tuple[int, int]:
    """One request through the relay: (bytes the client sent, bytes it received)."""
    out = lab.run(lab.client, "curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w",
                  "%{size_request} %{size_header} %{size_download}",
                  f"http://{WAN.peer4}:8080/who").stdout
    sent, header, body = map(int, out.split())
    assert body == 16, out
    return sent, header + body


def test_totals_match_the_traffic(lab: Lab, web):
    d = Tproxyd(lab, metrics_config(lab))
    up = down = 0
    for _ in range(5):
        s, r = fetch(lab)
        up, down = up + s, down + r

    def counted() -> Samples | None:
        got = counters(lab)
        return got if total(got, "tproxyd_bytes_total", direction="down") == down else None

    got = eventually(counted, "the bytes of five connections in the metrics", timeout=10)
    assert total(got, "tproxyd_bytes_total", direction="up", via="direct") == up
    ends = {dict(k[1])["end"]: v for k, v in got.items()
            if k[0] == "tproxyd_connections_total" and v}
    assert set(ends) <= {"client_fin", "server_fin"} and sum(ends.values()) == 5, ends
    assert total(got, "tproxyd_connections_total", proto="tcp", route="direct", via="direct") == 5
    gauges = samples(scrape(lab)[0], ("gauge",))
    assert gauges[("tproxyd_active_connections", (("proto", "tcp"),))] == 0
    assert gauges[("tproxyd_config_valid", ())] == 1
    assert time.time() - 60 < gauges[("tproxyd_config_last_good_timestamp_seconds", ())] <= time.time()
    (info,) = [k for k in gauges if k[0] == "tproxyd_build_info"]
    assert dict(info[1])["python"] == ".".join(map(str, sys.version_info[:3]))
    assert got[("tproxyd_reconciles_total", (("result", "ok"),))] >= 1
    assert got[("tproxyd_reconcile_duration_seconds_count", ())] >= 1
    assert d.status()["metrics"] == {"listen": LISTEN, "error": None}


UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
got = 0
for i in range(10):
    s.sendto(bytes([i]) * 100, (sys.argv[1], 7100))
    try:
        got += len(s.recv(65536)) == 100
    except TimeoutError:
        pass
print(got)
"""


def test_udp_datagrams_and_bytes_match_the_traffic(lab: Lab):
    lab.spawn(lab.server, sys.executable, PEERS, "udpecho", "7100")
    wait_for_port(lab, lab.server, 7100, "udp")
    d = Tproxyd(lab, metrics_config(lab, before="[relay]\nudp_idle_timeout = 1.0\n"))
    got = int(lab.run(lab.client, sys.executable, "-c", UDP_CLIENT, WAN.peer4).stdout)
    assert got >= 8  # a datagram may be lost; the counts below are held to what was received

    def counted() -> Samples | None:
        c = samples(scrape(lab)[0])
        return c if c[("tproxyd_udp_datagrams_total", (("direction", "down"),))] == got else None

    c = eventually(counted, "the datagrams in the metrics", timeout=10)
    assert c[("tproxyd_udp_datagrams_total", (("direction", "up"),))] == 10
    assert total(c, "tproxyd_bytes_total", direction="up") == 1000
    assert total(c, "tproxyd_bytes_total", direction="down") == 100 * got
    assert d.status()["counters"]["udp_sessions_opened"] == 1
    # one session, ended by udp_idle_timeout: no longer active, counted once as udp_expired
    ended = eventually(lambda: (c := samples(scrape(lab)[0])) and total(
        c, "tproxyd_connections_total", proto="udp") == 1 and c, "the session to expire",
        timeout=10)
    assert ended[conn("udp", "udp_expired")] == 1
    assert ended[("tproxyd_active_connections", (("proto", "udp"),))] == 0
    assert total(ended, "tproxyd_connections_total", proto="tcp") == 0


def test_no_counter_goes_down_across_a_sighup_and_killed_workers(lab: Lab, web):
    d = Tproxyd(lab, metrics_config(lab))
    for _ in range(3):
        fetch(lab)
    eventually(lambda: d.status()["counters"].get("accepted") == 3, "three accepted", timeout=10)
    first = counters(lab)
    # a slow transfer is open through each event: its bytes are counted while it runs
    slow = f"curl -sS --limit-rate 1M -o /dev/null http://{WAN.peer4}:8080/body"
    lab.spawn(lab.client, "sh", "-c", slow)
    eventually(lambda: d.status()["counters"].get("active", 0) >= 1, "the transfer to start",
               timeout=10)

    (old,) = worker_pids(d)
    os.kill(d.proc.pid, signal.SIGHUP)
    eventually(lambda: (p := worker_pids(d)) and old not in p, "a new worker", timeout=10)
    fetch(lab)
    second = counters(lab)
    assert_no_decrease(first, second, "after SIGHUP")

    lab.spawn(lab.client, "sh", "-c", slow)  # on the new worker: cut by the kill
    (pid,) = worker_pids(d)  # started by the daemon we started
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: (p := worker_pids(d)) and pid not in p, "a restarted worker")
    third = counters(lab)
    assert_no_decrease(second, third, "after kill -9 of a worker")
    for _ in range(2):  # a crash loop in the making: killed again as soon as it is back
        (pid,) = worker_pids(d)
        os.kill(pid, signal.SIGKILL)
        eventually(lambda gone=pid: (p := worker_pids(d)) and gone not in p, "a restart",
                   timeout=5)
        now = counters(lab)
        assert_no_decrease(third, now, "after another kill -9")
        third = now
    fetch(lab)
    eventually(lambda: d.status()["counters"].get("accepted", 0) >= 6, "the next one counted",
               timeout=10)
    fourth = counters(lab)
    assert_no_decrease(third, fourth, "after the restarted worker's first connection")
    assert fourth[("tproxyd_worker_restarts_total", ())] == first.get(
        ("tproxyd_worker_restarts_total", ()), 0) + 3
    assert total(fourth, "tproxyd_bytes_total", direction="down") > total(
        first, "tproxyd_bytes_total", direction="down") + (256 << 10)  # the transfers' bytes


def test_promtool_finds_nothing_and_openmetrics_on_request(lab: Lab, web):
    if not os.access(PROMTOOL, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{PROMTOOL} missing: .ci/setup installs it")
        pytest.skip(f"{PROMTOOL} missing: sh .ci/setup installs it")
    Tproxyd(lab, metrics_config(lab))
    fetch(lab)
    text, content_type = scrape(lab)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    check = lab.run(lab.gw, PROMTOOL, "check", "metrics", input=text, check=False)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check
    text, content_type = scrape(lab, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=")
    assert text.endswith("\n# EOF\n")
    names = {f.name for f in parse_om(text)}
    assert {"tproxyd_connections", "tproxyd_reconcile_duration_seconds",
            "tproxyd_build_info"} <= names


ROUTES = """
[[upstream]]
name = "socks"
type = "socks5"
address = "127.0.0.1:1080"
check_interval = 1
[[route]]
name = "corp"
ports = [8080]
via = ["socks"]
[[route]]
name = "ads"
ports = [8081]
via = "reject"
"""


def path(proto: str, route: str, via: str, end: str) -> tuple[str, tuple]:
    return ("tproxyd_connections_total",
            (("end", end), ("proto", proto), ("route", route), ("via", via)))


def get(lab: Lab, port: int) -> int:
    """curl's exit status for one request to the server's port (0: answered; 56: reset)."""
    return lab.run(lab.client, "curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                   f"http://{WAN.peer4}:{port}/who", check=False).returncode


def promtool_clean(lab: Lab, text: str) -> None:
    if not os.access(PROMTOOL, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{PROMTOOL} missing: .ci/setup installs it")
        pytest.skip(f"{PROMTOOL} missing: sh .ci/setup installs it")
    check = lab.run(lab.gw, PROMTOOL, "check", "metrics", input=text, check=False)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check


def test_connections_and_bytes_carry_their_route_and_via_across_a_reload(lab: Lab, web):
    """A route through a SOCKS5 upstream (microsocks in the gateway), a reject route and
    unrouted traffic: each counted under its route and via, bytes under their via; a SIGHUP
    (new workers) and a kill -9 take nothing back; promtool finds nothing to say."""
    if not shutil.which("microsocks"):
        pytest.skip("microsocks is not installed (sh .ci/setup installs it)")
    lab.spawn(lab.gw, "microsocks", "-i", "127.0.0.1", "-p", "1080")
    wait_for_port(lab, lab.gw, 1080)
    lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
              "--directory", lab.tmp, "8082")
    wait_for_port(lab, lab.server, 8082)
    d = Tproxyd(lab, metrics_config(lab) + ROUTES)
    assert get(lab, 8080) == 0  # corp, through socks
    assert get(lab, 8081) != 0  # ads: reset at accept
    assert get(lab, 8082) == 0  # no route: direct

    def counted() -> Samples | None:
        got = counters(lab)
        return got if total(got, "tproxyd_connections_total") == 3 else None

    first = eventually(counted, "three connections in the metrics", timeout=10)
    corp = [k for k, v in first.items() if v and k[0] == "tproxyd_connections_total"
            and dict(k[1])["route"] == "corp"]
    assert len(corp) == 1 and dict(corp[0][1])["via"] == "socks", corp
    assert dict(corp[0][1])["end"] in ("client_fin", "server_fin")
    assert first[path("tcp", "ads", "reject", "rejected")] == 1
    assert total(first, "tproxyd_connections_total", route="direct", via="direct") == 1
    for via in ("socks", "direct"):  # the same small page each way
        assert total(first, "tproxyd_bytes_total", direction="down", via=via) > 16
        assert total(first, "tproxyd_bytes_total", direction="up", via=via) > 0
    assert total(first, "tproxyd_bytes_total", via="reject") == 0
    labels = {v for (name, ls), _ in first.items() for k, v in ls if k in ("route", "via")}
    assert labels <= {"corp", "ads", "direct", "socks", "reject"}  # never an address
    # socks has check_interval = 1: the latest check's duration, a few ms on loopback
    checked = eventually(lambda: samples(scrape(lab)[0], ("gauge",)).get(
        ("tproxyd_upstream_check_seconds", (("upstream", "socks"),))), "a check's duration")
    assert 0 < checked < 1
    promtool_clean(lab, scrape(lab)[0])

    (old,) = worker_pids(d)
    os.kill(d.proc.pid, signal.SIGHUP)
    eventually(lambda: (p := worker_pids(d)) and old not in p, "a new worker", timeout=10)
    second = counters(lab)
    assert_no_decrease(first, second, "after SIGHUP")
    assert get(lab, 8080) == 0  # the new worker counts on top of the old one's totals
    assert get(lab, 8081) != 0
    third = eventually(lambda: (c := counters(lab)) and total(
        c, "tproxyd_connections_total") == 5 and c, "two more connections", timeout=10)
    assert_no_decrease(second, third, "after the new worker's connections")
    assert third[path("tcp", "ads", "reject", "rejected")] == 2
    assert total(third, "tproxyd_connections_total", route="corp", via="socks") == 2
    assert total(third, "tproxyd_bytes_total", direction="down", via="socks") > total(
        first, "tproxyd_bytes_total", direction="down", via="socks")
    (pid,) = worker_pids(d)  # started by the daemon we started
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: (p := worker_pids(d)) and pid not in p, "a restarted worker", timeout=10)
    assert_no_decrease(third, counters(lab), "after kill -9 of the worker")
    promtool_clean(lab, scrape(lab)[0])


def refused(lab: Lab, ns: str, url: str) -> bool:
    """curl's exit 7: nothing listens there (connection refused)."""
    return lab.run(ns, "curl", "-sS", "--max-time", "3", url, check=False).returncode == 7


def test_the_endpoint_is_only_on_the_configured_address(lab: Lab):
    d = Tproxyd(lab, metrics_config(lab))
    assert scrape(lab)[0]
    listening = lab.run(lab.gw, "ss", "-ltnH", "sport = :9641").stdout.split("\n")
    assert [ln.split()[3] for ln in listening if ln] == [LISTEN]
    for ns, url in ((lab.gw, f"http://{LAN.gw4}:9641/metrics"),
                    (lab.gw, "http://[::1]:9641/metrics"),
                    (lab.client, f"http://{LAN.gw4}:9641/metrics"),
                    (lab.client, f"http://[{LAN.gw6}]:9641/metrics")):
        assert refused(lab, ns, url), url
    # garbage gets 400 and a close; the daemon serves the next scrape
    reply = lab.run(lab.gw, "socat", "-t", "3", "-", f"TCP:{LISTEN}",
                    input="\x16\x03\x01 not http\r\n\r\n").stdout
    assert reply.startswith("HTTP/1.1 400 Bad Request")
    assert scrape(lab)[0]

    # IPv6, on the LAN address: reachable from the LAN over IPv6 only
    v6 = f"[{LAN.gw6}]:9641"
    d.save(metrics_config(lab, v6), "rename")
    eventually(lambda: refused(lab, lab.gw, f"http://{LISTEN}/metrics"), "the old address closed")
    body, _ = eventually(lambda: scrape_or_none(lab, v6, lab.client), "the new address to serve")
    assert "tproxyd_build_info" in body
    assert refused(lab, lab.client, f"http://{LAN.gw4}:9641/metrics")  # v6-only
    assert d.status()["metrics"] == {"listen": v6, "error": None}

    d.save(config(lab), "rename")  # [metrics] gone: off
    eventually(lambda: refused(lab, lab.client, f"http://{v6}/metrics"), "the endpoint closed")
    assert d.status()["metrics"] == {"listen": None, "error": None}
    assert not lab.run(lab.gw, "ss", "-ltnH", "sport = :9641").stdout.strip()


def scrape_or_none(lab: Lab, where: str, ns: str) -> tuple[str, str] | None:
    try:
        return scrape(lab, where, ns=ns)
    except Exception:
        return None


def test_reconciles_drift_repairs_and_config_validity_are_counted(lab: Lab):
    d = Tproxyd(lab, metrics_config(lab))
    before = counters(lab)
    lab.run(lab.gw, "ip", "rule", "del", "pref", "10000")  # drift: one of our two rules gone
    after = eventually(lambda: (c := counters(lab)) and c[
        ("tproxyd_drift_repairs_total", (("kind", "rule"),))] == 1 and c, "the repair counted",
        timeout=5)
    assert after[("tproxyd_drift_repairs_total", (("kind", "nft_table"),))] == 0
    assert after[("tproxyd_reconciles_total", (("result", "ok"),))] > before[
        ("tproxyd_reconciles_total", (("result", "ok"),))]
    d.save("[relay\n")  # broken: the last good config stays in force, and metrics say so
    eventually(lambda: samples(scrape(lab)[0])[("tproxyd_config_valid", ())] == 0,
               "config_valid 0")
    d.save(metrics_config(lab))
    eventually(lambda: samples(scrape(lab)[0])[("tproxyd_config_valid", ())] == 1,
               "config_valid 1 again")


def test_a_taken_address_is_reported_and_taken_when_free(lab: Lab):
    squatter = lab.spawn(lab.gw, sys.executable, "-c", "import socket, time; s = socket."
                         "create_server(('127.0.0.1', 9641)); time.sleep(600)")
    wait_for_port(lab, lab.gw, 9641)
    d = Tproxyd(lab, metrics_config(lab, before="resync_interval = 0.5\n"))
    error = d.status()["metrics"]["error"]
    assert error and "cannot listen on 127.0.0.1:9641" in error
    assert "metrics: NOT SERVED: cannot listen on 127.0.0.1:9641" in d.tproxy("status").stdout
    assert "metrics: cannot listen on 127.0.0.1:9641" in lab.log_of(d.proc)
    assert d.status()["in_sync"]  # the gateway runs regardless
    lab.stop(squatter)
    eventually(lambda: d.status()["metrics"]["error"] is None, "the address taken at a resync",
               timeout=5)
    assert "tproxyd_build_info" in scrape(lab)[0]


STALLER = """
import socket, sys, time
held = []
for i in range(10):
    s = socket.create_connection(("127.0.0.1", 9641))
    if i % 2:
        s.send(b"GET /metrics HTTP/1.1\\r\\n")  # half a request, never finished
    held.append(s)
print("holding", flush=True)
time.sleep(60)
"""


def test_stalled_scrapers_hold_up_neither_scrapes_nor_status_nor_a_save(lab: Lab):
    d = Tproxyd(lab, metrics_config(lab))
    staller = lab.spawn(lab.gw, sys.executable, "-c", STALLER)
    eventually(lambda: "holding" in lab.log_of(staller), "ten connections held", timeout=10)
    t = time.monotonic()
    assert "tproxyd_build_info" in scrape(lab)[0]
    assert d.status()["metrics"]["error"] is None
    d.save(metrics_config(lab).replace('"198.18.2.0/24"', '"198.18.2.0/24", "198.19.0.0/16"'),
           "rename")
    eventually(lambda: "198.19.0.0/16" in lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd",
                                                  "lan_dst4").stdout, "the save to converge")
    print(f"scrape, status and a save with 10 stalled scrapers: {time.monotonic() - t:.2f}s")
    # the stalled ones are answered 408 and closed after READ_TIMEOUT (5 s), not kept for ever
    eventually(lambda: not lab.run(lab.gw, "ss", "-tnH", "state", "established",
                                   "sport = :9641").stdout.strip(),
               "the stalled connections closed", timeout=15)
    lab.stop(staller)
