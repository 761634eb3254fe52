"""Which of the relay's modules run compiled (setup.py builds them with mypyc when it can).

A compiled module is a shared object beside its source, and Python prefers it: so a source
edited after the build would not run. stale() finds that case in a working tree (setup.py
beside the package's folders), for tests/conftest.py to build again and for the relay to warn
at start. An installed package is built whole and its files' times say nothing (an installer
may write a source after its build), so there it is never stale. No imports of the relay
here: setup.py reads COMPILED from this file.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

COMPILED = ("loop", "connection", "flow")  # relay/NAME.py: the per-connection path
# mypyc's group: the compiled code of all of COMPILED, in relay/_native__mypyc.*.so; each
# module's own .so is a stub that hands over to it (and is not rebuilt when a source changes)
GROUP = "_native"
HERE = Path(__file__).resolve().parent


def _built(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def compiled() -> bool:
    """True when every module of COMPILED has its compiled form beside it (it is what runs)."""
    return _built(f"{GROUP}__mypyc") is not None and all(_built(n) is not None for n in COMPILED)


def stale() -> list[str]:
    """The modules of COMPILED whose source is newer than their compiled form (which runs), in a
    working tree; [] in an installed package."""
    group = _built(f"{GROUP}__mypyc")
    if group is None or not (HERE.parent / "setup.py").exists():
        return []
    built = group.stat().st_mtime
    return [name for name in COMPILED
            if (HERE / f"{name}.py").exists() and (HERE / f"{name}.py").stat().st_mtime > built]
