"""The Debian package, built from this checkout by `packaging/build-deb`: what it depends on,
what it installs, that installing it starts nothing, and that the packaged code converges a
gateway when run by Debian's own python3 with Debian's libraries (no venv, no pip)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import Lab
from tests.conftest import Tproxy

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def field(deb: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], text=True, capture_output=True,
                          check=True).stdout.strip()


def packaged(root: Path, *args: str) -> list:
    """A command of the package run the way its /usr/bin scripts run: Debian's python3."""
    return ["env", f"PYTHONPATH={root}/usr/lib/python3/dist-packages", "/usr/bin/python3", *args]


def names(deb: str, name: str) -> set:
    return {d.strip().split()[0] for d in field(deb, name).split(",")}


def test_depends_on_debians_own_libraries_and_only_what_runs(package):
    """The daemon and `tproxy` use libnftables and rtnetlink: nft and ip are the admin's tools."""
    arch = subprocess.run(["dpkg", "--print-architecture"], text=True, capture_output=True,
                          check=True).stdout.strip()
    assert field(package["deb"], "Architecture") == arch  # the relay's compiled modules
    assert field(package["deb"], "Version") == "0.1.0-1"
    assert names(package["deb"], "Depends") - {"python3:any", "python3-tomli", "python3"} == {
        "python3-pyroute2", "python3-nftables", "python3-watchdog", "python3-prometheus-client",
        "python3-idna", "libc6"}
    assert names(package["deb"], "Recommends") == {"iproute2", "nftables", "python3-cryptography"}


def test_the_source_package_is_built_and_lintian_is_clean(package):
    """Issue 15 item 5: `dpkg-buildpackage -S` did not work and lintian said no-manual-page."""
    out = Path(package["deb"]).parent
    dsc = out / "tproxyd_0.1.0-1.dsc"
    assert dsc.is_file() and (out / "tproxyd_0.1.0.orig.tar.xz").is_file()
    debian = subprocess.run(["tar", "-tJf", str(out / "tproxyd_0.1.0-1.debian.tar.xz")],
                            text=True, capture_output=True, check=True).stdout.split()
    assert {"debian/tests/control", "debian/watch", "debian/rules"} <= set(debian)
    lint = subprocess.run(["lintian", "--pedantic", "-I", "-E", "--tag-display-limit", "0",
                           str(dsc), package["deb"]], text=True, capture_output=True, timeout=600)
    tags = [ln for ln in lint.stdout.splitlines() if ln[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert lint.returncode == 0 and tags == [], lint.stdout + lint.stderr
    overrides = (REPO / "packaging/debian/tproxyd.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):  # every override says why, on the line above it
        if line and not line.startswith("#"):
            assert i and overrides[i - 1].startswith("#"), line


def test_the_autopkgtest_runs_the_packaged_commands_as_root_on_a_machine_of_its_own():
    control = (REPO / "packaging/debian/tests/control").read_text()
    assert "Tests: gateway" in control and "Depends: @," in control
    assert "Restrictions: needs-root, isolation-machine" in control
    assert os.access(REPO / "packaging/debian/tests/gateway", os.X_OK)


@pytest.mark.parametrize("page", ["man8/tproxy.8.gz", "man8/tproxyd.8.gz", "man5/tproxy.toml.5.gz"])
def test_man_pages_are_installed_and_render_without_warnings(package, page):
    path = package["root"] / "usr/share/man" / page
    assert path.is_file()
    shown = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(path)], text=True,
                           capture_output=True, timeout=60, env={**os.environ, "MANWIDTH": "80"})
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "SEE ALSO" in shown.stdout


def test_installs_the_commands_the_unit_and_a_conffile(package):
    root = package["root"]
    for path in ("usr/bin/tproxy", "usr/bin/tproxyd", "lib/systemd/system/tproxyd.service",
                 "etc/tproxyd/tproxy.toml", "usr/lib/python3/dist-packages/tproxyd/relay/loop.py"):
        assert (root / path).is_file(), path
    assert (root / "usr/bin/tproxy").read_text().startswith("#!/usr/bin/python3\n")
    assert sorted((root / "DEBIAN/conffiles").read_text().split()) == [
        "/etc/logrotate.d/tproxyd", "/etc/tproxyd/tproxy.toml"]  # and the access log's rotation


def test_the_relay_runs_compiled_on_debians_python(package):
    """setup.py's mypyc build (the relay's per-connection modules) is what the package runs."""
    root = package["root"]
    out = subprocess.run(packaged(root, "-c", "from tproxyd.relay import loop, native; "
                                              "print(native.compiled(), native.stale(), loop.__file__)"),
                         text=True, capture_output=True, check=True).stdout.split()
    assert out[:2] == ["True", "[]"] and out[2].endswith(".so"), out
    site = root / "usr/lib/python3/dist-packages"
    assert not [p.name for p in site.glob("*.so")]  # the shared part is inside tproxyd/relay


def test_ships_tproxyd_and_nothing_of_the_lab(package):
    """The namespace lab sweeps namespaces by name: it stays in the checkout (lab/)."""
    site = package["root"] / "usr/lib/python3/dist-packages"
    modules = sorted(str(p.relative_to(site)) for p in site.rglob("*.py"))
    assert modules and all(m.split("/")[:2] in (["tproxyd", "state"], ["tproxyd", "reconciler"],
                                                ["tproxyd", "relay"]) for m in modules), modules
    assert not [m for m in modules if "lab" in Path(m).stem.split("_")]


def test_the_shipped_config_is_valid_and_captures_nothing(package):
    root = package["root"]
    out = subprocess.run(packaged(root, str(root / "usr/bin/tproxy"), "check", "--config-only",
                                  "-c", str(root / "etc/tproxyd/tproxy.toml")),
                         text=True, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ": valid" in out.stdout and "nothing to intercept" in out.stdout
    assert not [ln for ln in out.stdout.splitlines() if ln.strip().startswith("intercept ")]


def script(root: Path, name: str) -> str:
    path = root / "DEBIAN" / name
    return path.read_text() if path.exists() else ""


def test_a_fresh_install_enables_and_starts_nothing(package):
    """Like Debian's nftables: enabled by the admin, once the config names an intercept. The
    postinst's start goes through deb-systemd-invoke, which skips a disabled unit."""
    postinst = script(package["root"], "postinst")
    assert "deb-systemd-helper enable" not in postinst.replace(
        "if deb-systemd-helper --quiet was-enabled 'tproxyd.service'; then\n"
        "\t\t\t# Create new symlinks, if any.\n\t\t\tdeb-systemd-helper enable", "")
    assert "deb-systemd-invoke $_dh_action 'tproxyd.service'" in postinst


def test_an_upgrade_restarts_a_running_gateway_after_unpacking(package):
    """Issue 15 item 1: the old package stopped it in the preinst and never started it again."""
    root = package["root"]
    assert "stop" not in script(root, "preinst")  # the gateway stays up while files change
    postinst = script(root, "postinst")
    reload_at = postinst.index("systemctl --system daemon-reload")
    assert reload_at < postinst.index("_dh_action=restart") < postinst.index("deb-systemd-invoke $_dh_action")


def test_removal_stops_the_daemon_and_purge_leaves_nothing(package):
    """Issue 15 item 2: the prerm did not stop it, leaving it running with its code deleted."""
    root = package["root"]
    prerm = script(root, "prerm")
    assert "[ \"$1\" = remove ]" in prerm and "deb-systemd-invoke stop 'tproxyd.service'" in prerm
    assert prerm.index("deb-systemd-invoke stop") < prerm.index("tproxy down")
    assert "rm -rf /etc/tproxyd /run/tproxyd" in script(root, "postrm")


def unit_text(root: Path) -> str:
    return (root / "lib/systemd/system/tproxyd.service").read_text()


def test_the_unit_verifies(package, tmp_path):
    root = package["root"]
    unit = unit_text(root)
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    local = tmp_path / "tproxyd.service"  # the unit pointed at the unpacked binaries
    local.write_text(unit.replace("/usr/bin/tproxy", f"{root}/usr/bin/tproxy"))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, "MANPATH": str(root / "usr/share/man")})
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def test_reload_needs_no_procps(package):
    """Issue 15 item 3: ExecReload=/bin/kill failed with 203/EXEC where procps is absent."""
    reload = [ln for ln in unit_text(package["root"]).splitlines() if ln.startswith("ExecReload=")]
    assert reload == ["ExecReload=/usr/bin/tproxy reload --config /etc/tproxyd/tproxy.toml"]


def test_ordered_like_nftables_without_holding_the_network_behind_basic_target(package):
    """Issue 15 item 7: Before=network-pre.target with default dependencies (After=basic.target)."""
    unit = unit_text(package["root"]).splitlines()
    assert "DefaultDependencies=no" in unit and "Before=network-pre.target shutdown.target" in unit
    assert "Conflicts=shutdown.target" in unit
    after = next(ln for ln in unit if ln.startswith("After=")).split("=", 1)[1].split()
    assert "basic.target" not in after and "sysinit.target" not in after


def test_hardened_to_an_exposure_of_at_most_2(package, tmp_path):
    """Issue 15 item 6: 6.8. The README quotes the score; each directive left out says why."""
    local = tmp_path / "tproxyd.service"
    local.write_text(unit_text(package["root"]))
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(local)], text=True,
                         capture_output=True, timeout=60)
    score = float(out.stdout.rsplit("exposure level for tproxyd.service:", 1)[1].split()[0])
    assert score <= 2.0, out.stdout
    assert f"exposure {score}" in (REPO / "README.md").read_text()


def test_packaged_code_converges_a_gateway_on_debians_python(package, lab: Lab):
    root = package["root"]
    where = lab.run(lab.gw, *packaged(root, "-c", "import tproxyd.state; print(tproxyd.state.__file__)"))
    assert where.stdout.startswith(str(root))
    config = Tproxy(lab, lab.write_config(lab.config(destinations='["198.18.2.0/24"]'))).config
    tproxy = [*packaged(root, str(root / "usr/bin/tproxy"))]
    first = lab.run(lab.gw, *tproxy, "apply", "-c", config)
    assert "applied" in first.stdout
    assert lab.run(lab.gw, *tproxy, "plan", "-c", config, check=False).returncode == 0
    assert "table inet tproxyd" in lab.run(lab.gw, "nft", "list", "ruleset").stdout
    lab.run(lab.gw, *tproxy, "down", "-c", config)
    assert "tproxyd" not in lab.run(lab.gw, "nft", "list", "ruleset").stdout
