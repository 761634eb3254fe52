"""A pytest plugin (`-p tests.pure_relay`): the relay's compiled modules load from their
sources instead, as they run where mypyc was missing when the package was built."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any, Sequence

from tproxyd.relay import native  # the package's __init__ only: nothing compiled is loaded

PREFIX = "tproxyd.relay."


class _FromSource(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        module = name[len(PREFIX):] if name.startswith(PREFIX) else ""
        if module not in native.COMPILED:
            return None
        return importlib.util.spec_from_file_location(name, native.HERE / f"{module}.py")


sys.meta_path.insert(0, _FromSource())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name in native.COMPILED:
        module = importlib.import_module(PREFIX + name)
        terminalreporter.write_line(f"relay module from: {module.__file__}")
