"""Compiles the relay's hot modules with mypyc when it is there (Debian: python3-mypy); the rest
of the build is pyproject.toml's. Without mypyc, or with TPROXYD_PURE=1, the package is pure
Python and the relay runs the same modules as source.

Compiled, the relay makes x1.08 the connections a second on one core (8 side-by-side runs
1.072-1.098, relay CPU a connection x0.920: `python -m bench.profile --compare PURE COMPILED
--side-by-side`, 2026-12-03). Only the per-connection path is compiled: the event loop, the
connection's states and its flows, the TLS and HTTP parsers that read a name, and the route
and name lookups (see relay/native.py). Everything else (config, control plane, handshakes,
the SNIFFING state's own steps) stays source: it is not where a connection's time goes.

mypy names a module by the folders with an __init__.py above it, and this tree's folders are
subpackages of `tproxyd` only through setuptools' package-dir: so mypyc reads them through a
`tproxyd/` of symlinks under build/, and the modules come out as tproxyd.relay.*. They go in
one group (native calls between them), whose shared library, tproxyd.relay._native__mypyc,
holds their code, inside the package rather than at the top level of site-packages. A build
records what it was made from (relay/native.py), so that a checkout knows when to build again.
TPROXYD_PURE=1 decides the build only: in a checkout, compiled modules already built stay
(`git clean -fX relay/ state/` removes them).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def native(here: Path) -> Any:
    """relay/native.py (what is compiled), read without importing the relay."""
    spec = importlib.util.spec_from_file_location("native", here / "relay" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extensions() -> list:
    """mypyc's extensions (mypy reads and checks the sources and writes the C); [] without
    mypyc, when it cannot be imported, or with TPROXYD_PURE=1: the build is pure Python."""
    if os.environ.get("TPROXYD_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    tree = HERE / "build" / "mypyc-src" / "tproxyd"
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "__init__.py").touch()
    for package in ("relay", "state", "reconciler"):
        link = tree / package
        if link.is_symlink() and os.readlink(link) != str(HERE / package):
            link.unlink()  # build/ copied or moved with a checkout: this tree's sources only
        if not link.is_symlink():
            link.symlink_to(HERE / package, target_is_directory=True)
    what = native(HERE)
    paths = [str(tree / f"{name}.py") for name in what.COMPILED]
    # relative to here: the C files and mypy's cache under build/, whatever the caller's cwd
    os.chdir(HERE)
    # only the compiled modules are held to mypy's checks: the rest is read for their types
    options = ["--ignore-missing-imports", "--follow-imports=silent",
               "--cache-dir", "build/mypy-cache"]
    return mypycify([*options, *paths], separate=[(paths, f"tproxyd.relay.{what.GROUP}")],
                    target_dir="build/mypyc")


class BuildExt(build_ext):
    """build_ext, then the record of what the compiled modules were built from."""

    def run(self) -> None:
        super().run()
        if self.extensions:
            native(HERE).record()


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
