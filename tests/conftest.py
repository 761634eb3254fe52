"""Shared fixtures: the namespace lab for kernel tests (root only; removed even when a test fails)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Iterator

import pytest

from lab import Lab
from tproxyd.relay import native


def _build_stale_relay() -> None:
    """The relay's compiled modules run instead of their sources (relay/native.py): build them
    again when a source differs from what they were built from, before a test imports them,
    so that no test runs an old relay. A build that fails, or that leaves them stale (no mypyc
    now, TPROXYD_PURE=1), stops the session with its output."""
    if not native.stale():
        return
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                           cwd=native.HERE.parent, text=True, capture_output=True)
    left = native.stale()
    if built.returncode or left:
        pytest.exit(f"the relay's compiled modules are stale ({', '.join(left)}) and building "
                    f"them again failed:\n{built.stdout[-6000:]}{built.stderr[-4000:]}",
                    returncode=3)


_build_stale_relay()


def _kernel_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces"
    if not shutil.which("ip") or not shutil.which("nft"):
        return "needs iproute2 and nftables (sh .ci/setup installs them)"
    return ""


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`tproxy` remembers rendered configs in /run/tproxyd/cache by default: not from tests."""
    saved = os.environ.get("TPROXYD_CACHE_DIR")
    os.environ["TPROXYD_CACHE_DIR"] = str(tmp_path_factory.mktemp("desired-cache"))
    yield
    if saved is None:
        os.environ.pop("TPROXYD_CACHE_DIR", None)
    else:
        os.environ["TPROXYD_CACHE_DIR"] = saved


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _kernel_unavailable()
    if reason:
        if os.environ.get("CI"):  # CI runs as root: a skipped kernel test there is a failure
            pytest.fail(f"kernel test cannot run in CI: {reason}")
        pytest.skip(reason)
    with Lab(forwarding=True) as the_lab:
        yield the_lab


# curl's exit codes for a connection the far end reset: it could not connect (7: the RST beat
# the handshake's end), failed sending its request (55) or reading the answer (56); which one
# is a race between the RST and curl's own steps.
CURL_RESET = (7, 55, 56)


class Tproxy:
    """The `tproxy` command, run inside the lab's gateway namespace as an operator would."""

    def __init__(self, lab: Lab, config: str):
        self.lab, self.config = lab, config

    def __call__(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.lab.run(self.lab.gw, sys.executable, "-m", "tproxyd.reconciler.cli", *args,
                            "-c", self.config, check=check)

    def json(self, *args: str) -> dict:
        proc = self(*args, "--json")
        assert proc.stdout, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def tproxy(lab: Lab) -> Tproxy:
    """`tproxy` against a config capturing lan0 to the lab's server network (v4 and v6)."""
    return Tproxy(lab, lab.write_config(lab.config(
        destinations='["198.18.2.0/24", "2001:db8:2::/64"]')))
