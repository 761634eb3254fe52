"""A pytest plugin (`-p tests.pure_relay`): the compiled modules (relay/native.py) load from their
sources instead, as they run where mypyc was missing when the package was built."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any, Sequence

from tproxyd.relay import native  # the package's __init__ only: nothing compiled is loaded

SOURCES = {native.module_name(name): name for name in native.COMPILED}


class _FromSource(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        source = SOURCES.get(name)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(name, native.HERE.parent / f"{source}.py")


sys.meta_path.insert(0, _FromSource())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name in SOURCES:
        module = importlib.import_module(name)
        terminalreporter.write_line(f"relay module from: {module.__file__}")
