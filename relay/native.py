"""Which modules run compiled (setup.py builds them with mypyc when it can): the relay's hot path.

A compiled module is a shared object beside its source, and Python prefers it: a source edited
after the build would not run. And the compiled code holds the types it read from the modules
it imports (an Address is an unboxed pair, a result is checked against its annotation), so an
edit there can be stale too. So a build records what it was made from (record(), called by
setup.py's build_ext): every source of relay/ and state/, by content; stale() names what
differs now. That is a working tree's question (setup.py beside the package's folders), asked
by tests/conftest.py, which builds again, and by the relay, which warns at start. An installed
package is built whole: never stale. No imports of the relay here: setup.py loads this file.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

# NAME.py under the package's root: the relay's per-connection path; the parsers of a
# connection routed by name (their parse on an idle relay, one connection at a time, took the
# name's SYN to the server 13.1 us after a route by address, 6.7 us compiled: bench.sniffing
# --gap, 2026-12-03); and the route and name lookups every routed connection makes (with them,
# 5.2 us against 8.1 in the same hour: bench.sniffing --gap)
COMPILED = ("relay/loop", "relay/connection", "relay/flow", "relay/sniff", "relay/sniff_tls",
            "relay/sniff_http", "state/routes", "state/domains")
# mypyc's group: the compiled code of all of COMPILED, in relay/_native__mypyc.*.so; each
# module's own .so is a stub that hands over to it
GROUP = "_native"
HERE = Path(__file__).resolve().parent
READ = ("relay", "state")  # the folders whose sources mypy reads for the compiled modules


def _built(name: str) -> Path | None:
    """NAME's extension module under the package's root ("relay/loop"), if built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE.parent / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def compiled() -> bool:
    """True when the group and every module of COMPILED are built beside their sources: what
    runs is the compiled code."""
    return _built(f"relay/{GROUP}__mypyc") is not None and all(_built(n) is not None
                                                              for n in COMPILED)


def _record_path() -> Path:
    return HERE.parent / "build" / "mypyc" / "sources.json"


def _sources() -> dict[str, str]:
    root = HERE.parent
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in READ for path in sorted((root / folder).glob("*.py"))}


def record() -> None:
    """After a build in a working tree: what it was made from (stale() compares with it)."""
    path = _record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_sources(), indent=0, sort_keys=True))


def stale() -> list[str]:
    """The sources that differ from those the compiled modules were built from, in a working
    tree ("(no record of the build)" when there is none); [] in an installed package, or
    when nothing is compiled."""
    if _built(f"relay/{GROUP}__mypyc") is None or not (HERE.parent / "setup.py").exists():
        return []
    try:
        built = json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return ["(no record of the build)"]
    now = _sources()
    return sorted(name for name in now.keys() | built.keys() if now.get(name) != built.get(name))


def module_name(name: str) -> str:
    """The import name of a COMPILED entry: "relay/loop" -> "tproxyd.relay.loop"."""
    return "tproxyd." + name.replace("/", ".")
