"""The namespace lab (it creates namespaces and sweeps them by name) and the demo live in lab/,
beside tests/ and bench/: nothing installed, and nothing the daemon or `tproxy` runs, can
reach them."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tproxyd.relay import native

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("state", "reconciler", "relay")  # mapped into the tproxyd package by pyproject


def _is_lab(name: str) -> bool:
    return name == "lab" or name.startswith("lab.") or name.split(".")[-1] == "lab"


def test_the_package_maps_only_the_production_folders():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setup["package-dir"].values()) == sorted(PRODUCTION)
    assert sorted(setup["packages"]) == sorted(f"tproxyd.{p}" for p in PRODUCTION)
    for folder in PRODUCTION:
        assert not [p.name for p in (ROOT / folder).iterdir() if p.stem == "lab"], folder
    assert (ROOT / "lab" / "netns.py").exists() and not (ROOT / "lab" / "pyproject.toml").exists()


def test_no_production_module_imports_the_lab():
    for folder in PRODUCTION:
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or "", *(a.name for a in node.names)]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names = [node.value]  # `python -m lab`, importlib.import_module("lab")
                else:
                    continue
                assert not [n for n in names if _is_lab(n)], f"{path}:{node.lineno} reaches the lab"


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(),
                    reason="needs git and a checkout (not a source package): builds from its files")
def test_the_wheel_holds_tproxyd_and_nothing_of_the_lab(tmp_path):
    """Built from the checkout's files as packaging/build-deb takes them, with pyproject's own
    mapping (the Debian package is this wheel, installed)."""
    pytest.importorskip("wheel", reason="needs the wheel package to build one")
    src = tmp_path / "src"
    src.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        rel = os.fsdecode(name)
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "out"), str(src)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "out").glob("tproxyd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if not n.split("/")[0].endswith(".dist-info")]
    assert modules and all(n.startswith(("tproxyd/state/", "tproxyd/reconciler/", "tproxyd/relay/"))
                           for n in modules), modules
    assert not [n for n in modules if _is_lab(Path(n).with_suffix("").as_posix().replace("/", "."))]
    assert "tproxyd/reconciler/cli.py" in modules and "tproxyd/reconciler/daemon.py" in modules
    # with mypyc here, the relay's compiled modules (setup.py puts mypyc's extensions in place
    # of its stand-in at build_ext): the group's library and one stub a module, nothing else
    if importlib.util.find_spec("mypyc") is not None and os.environ.get("TPROXYD_PURE") != "1":
        built = sorted(n.split(".")[0] for n in modules if n.endswith(".so"))
        assert built == sorted([f"tproxyd/relay/{native.GROUP}__mypyc",
                                *(f"tproxyd/{name}" for name in native.COMPILED)]), built


def test_lintian_is_told_about_each_compiled_shim():
    """mypyc's per-module shims link no libc (shared-library-lacks-prerequisites): the
    package's overrides name each one, so a module added to relay/native.py's COMPILED without
    its line fails here, not only in the package's lintian run."""
    overrides = (ROOT / "packaging/debian/tproxyd.lintian-overrides").read_text()
    for name in native.COMPILED:
        assert (f"tproxyd: shared-library-lacks-prerequisites "
                f"[usr/lib/python3/dist-packages/tproxyd/{name}.cpython-*.so]") in overrides, name
