"""The Debian package, built from this checkout by `packaging/build-deb`: what it depends on,
what it installs, that installing it starts nothing, and that the packaged code converges a
gateway when run by Debian's own python3 with Debian's libraries (no venv, no pip)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import Lab
from tests.conftest import Tproxy, _kernel_unavailable

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _kernel_unavailable()  # apt-get for the build dependencies needs root
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"package test cannot run in CI: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run(["sh", str(REPO / "packaging" / "build-deb"), str(out)], text=True,
                           capture_output=True, timeout=900)
    assert built.returncode == 0, built.stderr
    deb = built.stdout.strip().splitlines()[-1]
    root = out / "root"
    subprocess.run(["dpkg-deb", "-R", deb, str(root)], check=True)
    return {"deb": deb, "root": root}


def field(deb: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], text=True, capture_output=True,
                          check=True).stdout.strip()


def packaged(root: Path, *args: str) -> list:
    """A command of the package run the way its /usr/bin scripts run: Debian's python3."""
    return ["env", f"PYTHONPATH={root}/usr/lib/python3/dist-packages", "/usr/bin/python3", *args]


def test_depends_on_debians_own_libraries(package):
    assert field(package["deb"], "Architecture") == "all"
    depends = {d.strip().split()[0] for d in field(package["deb"], "Depends").split(",")}
    assert {"python3-pyroute2", "python3-nftables", "python3-watchdog",
            "python3-prometheus-client", "nftables", "iproute2"} <= depends


def test_installs_the_commands_the_unit_and_a_conffile(package):
    root = package["root"]
    for path in ("usr/bin/tproxy", "usr/bin/tproxyd", "lib/systemd/system/tproxyd.service",
                 "etc/tproxyd/tproxy.toml", "usr/lib/python3/dist-packages/tproxyd/relay/loop.py"):
        assert (root / path).is_file(), path
    assert (root / "usr/bin/tproxy").read_text().startswith("#!/usr/bin/python3\n")
    assert (root / "DEBIAN/conffiles").read_text().split() == ["/etc/tproxyd/tproxy.toml"]


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
    assert ": valid" in out.stdout and "0 sets" in out.stdout
    assert not [ln for ln in out.stdout.splitlines() if ln.strip().startswith("intercept ")]


def test_installing_starts_and_enables_nothing_and_the_unit_verifies(package, tmp_path):
    root = package["root"]
    scripts = "".join((root / "DEBIAN" / s).read_text() for s in ("postinst", "preinst"))
    assert "deb-systemd-invoke start" not in scripts and "_dh_action" not in scripts  # no start
    # enabled again on upgrade only where the admin had enabled it
    assert scripts.count("deb-systemd-helper enable") == scripts.count("--quiet was-enabled")
    unit = (root / "lib/systemd/system/tproxyd.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ExecReload=/bin/kill -HUP" in unit
    local = tmp_path / "tproxyd.service"  # the unit pointed at the unpacked binaries
    local.write_text(unit.replace("/usr/bin/tproxy", f"{root}/usr/bin/tproxy"))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], text=True,
                            capture_output=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


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
