"""The package on a clean Debian 12 (debootstrap minbase) booted with systemd-nspawn on a private
network, as an admin uses it: install, configure, reload, upgrade while running, remove, purge.

The tests run in file order on one container (each step is the state the next one starts from).
Packages come from Debian (downloaded into the root in a chroot; the booted container has no
network but its own veths)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import testinfra
from testinfra.backend.base import CommandResult
from testinfra.backend.local import LocalBackend

from tests.kernel import nspawn
from tests.kernel.conftest import REPO, _skip_or_fail, build

pytestmark = pytest.mark.kernel
CONF = "/etc/tproxyd/tproxy.toml"
ARCH = subprocess.run(["dpkg", "--print-architecture"], text=True, capture_output=True,
                      check=True).stdout.strip()  # the .debs' names (the relay is compiled)
# client (c0, namespace tpc) -- (lan0) the container (wan0) -- (s0, namespace tps) server
LAB = """
ip netns add tpc; ip netns add tps
ip link add lan0 type veth peer name c0 netns tpc
ip link add wan0 type veth peer name s0 netns tps
ip addr add 198.18.1.1/24 dev lan0; ip link set lan0 up
ip addr add 198.18.2.1/24 dev wan0; ip link set wan0 up
ip -n tpc addr add 198.18.1.2/24 dev c0; ip -n tpc link set c0 up; ip -n tpc link set lo up
ip -n tps addr add 198.18.2.2/24 dev s0; ip -n tps link set s0 up; ip -n tps link set lo up
ip -n tpc route add default via 198.18.1.1; ip -n tps route add default via 198.18.2.1
"""
# the server answers with the address it sees; the client prints it
FETCH = """
ip netns exec tps python3 -c '
import socket
s = socket.create_server(("198.18.2.2", 8080))
conn, peer = s.accept()
conn.sendall(peer[0].encode())' &
sleep 1
ip netns exec tpc python3 -c '
import socket
with socket.create_connection(("198.18.2.2", 8080), timeout=10) as s:
    print(s.recv(100).decode())'
wait
"""
INTERCEPT = """
[[intercept]]
name = "lan"
interfaces = ["lan0"]
destinations = ["198.18.2.0/24"]
"""


@pytest.fixture(scope="module")
def box(package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Booted]:
    reason = nspawn.unavailable()
    if reason:
        _skip_or_fail(reason)
    work = tmp_path_factory.mktemp("booted")
    upgrade = build(work / "v2", "0.1.0-2")  # the same tree, a higher version
    root = nspawn.Root(work)
    try:
        debs = root.path / "var/tmp/debs"
        debs.mkdir(parents=True)
        for deb in (package["deb"], upgrade):
            shutil.copy(deb, debs)
        shutil.copy(REPO / "packaging/debian/tests/gateway", debs / "autopkgtest-gateway")
        # Debian's packages for the install, downloaded with the host's network: nothing runs
        root.chroot("apt-get", "update", "-qq")
        root.chroot("apt-get", "install", "-y", "-qq", "--download-only",
                    f"/var/tmp/debs/{Path(package['deb']).name}")
        with nspawn.booted(root, work / "console.log") as booted:
            yield booted
    finally:
        root.remove()


def active(box: nspawn.Booted) -> str:
    return box.run("systemctl", "is-active", "tproxyd", check=False).stdout.strip()


def test_apt_installs_it_from_debian_alone_enabling_and_starting_nothing(box):
    out = box.run("apt-get", "install", "-y", f"/var/tmp/debs/tproxyd_0.1.0-1_{ARCH}.deb")
    assert "tproxyd" in out.stdout
    assert active(box) == "inactive"
    assert box.run("systemctl", "is-enabled", "tproxyd", check=False).stdout.strip() == "disabled"
    # path and md5 pairs: the config and the access log's logrotate snippet
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "tproxyd").stdout.split()[0::2]
    assert sorted(conffiles) == ["/etc/logrotate.d/tproxyd", CONF]
    assert box.run("test", "!", "-e", "/usr/bin/pkill").returncode == 0  # minbase: no procps
    check = box.run("tproxy", "check", "--config-only", "-c", CONF)
    assert ": valid" in check.stdout


def test_the_shipped_config_changes_nothing_on_the_host(box):
    """Issue 15 item 4: with no [[intercept]] it added rules, a route table and an nft table."""
    before = box.sh("ip rule; ip -6 rule; cat /proc/sys/net/ipv4/ip_forward").stdout
    box.run("systemctl", "start", "tproxyd", timeout=120)
    try:
        assert active(box) == "active", box.journal()
        assert box.run("nft", "list", "tables").stdout.strip() == ""
        assert box.sh("ip rule; ip -6 rule; cat /proc/sys/net/ipv4/ip_forward").stdout == before
        assert box.run("ip", "route", "show", "table", "100", check=False).stdout.strip() == ""
        status = box.run("tproxy", "status", "-c", CONF, check=False)
        assert "nothing to intercept" in status.stdout, status.stdout + status.stderr
    finally:
        box.run("systemctl", "stop", "tproxyd", timeout=120)


def test_the_unit_starts_as_notify_and_intercepts_a_connection_on_a_veth(box):
    box.sh(LAB)
    box.sh(f"cat >> {CONF} <<'EOF'\n{INTERCEPT}\nEOF")  # the admin's edit of the conffile
    box.sh(f"sed -i 's|^# access = \"/var/log|access = \"/var/log|' {CONF}")  # and the access log
    box.run("systemctl", "enable", "--now", "tproxyd", timeout=120)
    assert active(box) == "active", box.journal()
    assert box.run("systemctl", "show", "-P", "Type", "tproxyd").stdout.strip() == "notify"
    assert box.sh(FETCH, timeout=60).stdout.strip() == "198.18.1.2", box.journal()
    assert "table inet tproxyd" in box.run("nft", "list", "tables").stdout
    # ProtectSystem=strict: the log is writable only through LogsDirectory=tproxyd
    log = box.sh("for i in $(seq 50); do [ -s /var/log/tproxyd/access.log ] && break; sleep 0.2; "
                 "done; cat /var/log/tproxyd/access.log", timeout=60).stdout
    assert '"client":"198.18.1.2:' in log and '"dst":"198.18.2.2:8080"' in log, box.journal()


def test_reload_applies_a_good_file_and_refuses_a_broken_one_visibly(box):
    box.sh(f"sed -i 's|^destinations = \\[\"198.18.2.0/24\"\\]|destinations = [\"198.18.0.0/15\"]|' {CONF}")
    box.run("systemctl", "reload", "tproxyd", timeout=120)
    assert "198.18.0.0/15" in box.run("nft", "list", "set", "inet", "tproxyd", "lan_dst4").stdout
    box.sh(f"cp {CONF} /root/good.toml && sed -i 's/^port = 12345$/port = 70000/' {CONF}")
    refused = box.run("systemctl", "reload", "tproxyd", check=False, timeout=120)
    assert refused.returncode != 0
    assert "relay.port: 70000" in box.journal(), box.journal()  # the file's own error
    assert active(box) == "active"
    box.sh(f"cp /root/good.toml {CONF}")
    box.run("systemctl", "reload", "tproxyd", timeout=120)


class NspawnBackend(LocalBackend):
    """testinfra's local backend, with every command run in the booted container."""

    NAME = "nspawn"

    def __init__(self, init: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.init = init

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        return self.run_local("nsenter -t %s -a -- sh -c %s", str(self.init),
                              self.get_command(command, *args))


def test_the_running_gateway_as_an_operator_checks_it(box):
    host = testinfra.host.Host(NspawnBackend(box.init))
    service = host.service("tproxyd")
    assert service.is_running and service.is_enabled
    sock = host.file("/run/tproxyd/tproxyd.sock")
    assert sock.is_socket and sock.mode == 0o600 and sock.user == "root"
    assert host.file("/run/tproxyd").mode == 0o700
    conf = host.file(CONF)
    assert conf.is_file and conf.mode == 0o644 and conf.user == "root"
    for page in ("man8/tproxy.8.gz", "man8/tproxyd.8.gz", "man5/tproxy.toml.5.gz"):
        assert host.file(f"/usr/share/man/{page}").is_file
    assert host.file("/usr/share/doc/tproxyd/examples/tproxy.toml.example").is_file
    table = host.run("nft list table inet tproxyd")
    assert table.rc == 0 and "tproxy ip to :12345" in table.stdout
    assert "lookup 100 proto 201" in host.check_output("ip rule show")
    assert host.socket("tcp://0.0.0.0:12345").is_listening
    status = host.run(f"tproxy status -c {CONF}")
    assert status.rc == 0 and status.stdout.strip().endswith("in sync"), status.stdout


def test_an_upgrade_while_running_keeps_it_running_and_the_admins_edit(box):
    before = box.run("systemctl", "show", "-P", "MainPID", "tproxyd").stdout.strip()
    box.run("apt-get", "install", "-y", f"/var/tmp/debs/tproxyd_0.1.0-2_{ARCH}.deb",
            timeout=300)
    assert box.run("dpkg-query", "-W", "-f=${Version}", "tproxyd").stdout == "0.1.0-2"
    assert active(box) == "active", box.journal()
    after = box.run("systemctl", "show", "-P", "MainPID", "tproxyd").stdout.strip()
    assert after != before  # restarted on the new code
    assert "198.18.0.0/15" in box.run("cat", CONF).stdout
    assert "table inet tproxyd" in box.run("nft", "list", "tables").stdout
    assert box.sh(FETCH, timeout=60).stdout.strip() == "198.18.1.2", box.journal()


def test_the_autopkgtest_passes_on_the_installed_package(box):
    """debian/tests/gateway as autopkgtest runs it (needs-root, a machine of its own)."""
    box.run("mkdir", "-p", "/var/tmp/autopkgtest")
    out = box.run("env", "AUTOPKGTEST_TMP=/var/tmp/autopkgtest", "sh",
                  "/var/tmp/debs/autopkgtest-gateway", timeout=180)
    assert "intercepted: the server saw the client's own address" in out.stdout, out.stderr
    assert "nothing of tproxyd left" in out.stdout


def test_a_package_change_leaves_a_disabled_stopped_gateway_stopped(box):
    """Restarted after an upgrade only when enabled or running: the admin's stop holds."""
    box.run("systemctl", "disable", "--now", "tproxyd", timeout=120)
    box.run("apt-get", "install", "-y", "--allow-downgrades",
            f"/var/tmp/debs/tproxyd_0.1.0-1_{ARCH}.deb", timeout=300)
    assert active(box) == "inactive"
    box.run("systemctl", "enable", "--now", "tproxyd", timeout=120)  # running for the removal
    assert active(box) == "active", box.journal()


def test_removal_stops_it_and_purge_leaves_nothing(box):
    assert active(box) == "active"
    box.run("apt-get", "remove", "-y", "tproxyd", timeout=300)
    assert active(box) in ("inactive", "unknown")
    assert "tproxyd" not in box.run("nft", "list", "tables").stdout
    assert "proto 201" not in box.run("ip", "rule", "show").stdout
    box.run("apt-get", "purge", "-y", "tproxyd", timeout=300)
    for path in ("/etc/tproxyd", "/run/tproxyd", "/var/log/tproxyd",
                 "/lib/systemd/system/tproxyd.service"):
        assert box.run("test", "-e", path, check=False).returncode == 1, path
    assert box.run("ip", "route", "show", "table", "100", check=False).stdout.strip() == ""
