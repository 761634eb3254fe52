"""The Debian package, built once per session from this checkout by `packaging/build-deb`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import _kernel_unavailable

REPO = Path(__file__).resolve().parents[2]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"package test cannot run in CI: {reason}")
    pytest.skip(reason)


def build(out: Path, version: str | None = None) -> str:
    """The .deb's path; out also gets the source package."""
    built = subprocess.run(["sh", str(REPO / "packaging" / "build-deb"), str(out),
                            *([version] if version else [])], text=True, capture_output=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _kernel_unavailable()  # apt-get for the build dependencies needs root
    if reason:
        _skip_or_fail(reason)
    out = tmp_path_factory.mktemp("deb")
    deb = build(out)
    root = out / "root"
    subprocess.run(["dpkg-deb", "-R", deb, str(root)], check=True)
    return {"deb": deb, "root": root}
