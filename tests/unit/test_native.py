"""The relay's compiled modules (setup.py, mypyc): in force where mypyc is, and never stale."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tproxyd.relay import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("mypyc") is None,
                    reason="no mypyc (python3-mypy): the relay runs as pure Python")
def test_the_relay_that_runs_is_the_compiled_one_of_these_sources():
    """.ci/setup builds the relay as the package does: a build that fell back to pure Python,
    or one older than its sources, would have the tests measure something else."""
    assert native.compiled() and native.stale() == []
    for name in native.COMPILED:
        module = importlib.import_module(native.module_name(name))
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), module.__file__


def _own_nodes(func: ast.AST):
    """func's nodes, not those of the functions and classes defined inside it (their scopes)."""
    todo = list(ast.iter_child_nodes(func))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def test_no_compiled_function_binds_one_except_name_to_two_types():
    """mypyc gives a name one type, its first binding's: in `except A as exc: ... except B as
    exc:` a B is then checked against A, and the handler raises TypeError instead of running
    (found on a trial build with handshake.py compiled: HandshakeError became a native class,
    and in Relay._on_connection every OSError of a connection after `except HandshakeError as
    exc` was an internal error). Each handler of other types takes a name of its own."""
    clashes = []
    for name in native.COMPILED:
        tree = ast.parse((REPO / f"{name}.py").read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            types: dict[str, set[str]] = {}
            for node in _own_nodes(func):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            clashes += [f"{name}.py {func.name}(): {var} is {sorted(kinds)}"
                        for var, kinds in types.items() if len(kinds) > 1]
    assert clashes == []


def test_stale_names_what_changed_since_the_build_by_content(tmp_path, monkeypatch):
    relay, state = tmp_path / "relay", tmp_path / "state"
    relay.mkdir()
    state.mkdir()
    monkeypatch.setattr(native, "HERE", relay)
    for name in native.COMPILED:
        (tmp_path / f"{name}.py").write_text("x = 1\n")
    (state / "config.py").write_text("y = 2\n")
    assert not native.compiled() and native.stale() == []  # nothing built: nothing stale
    for name in native.COMPILED:
        (tmp_path / f"{name}{SUFFIX}").write_bytes(b"")
    assert not native.compiled()  # not without the group's library, which holds the code
    (relay / f"{native.GROUP}__mypyc{SUFFIX}").write_bytes(b"")
    assert native.compiled() and native.stale() == []  # installed: no setup.py beside, never stale
    (tmp_path / "setup.py").write_text("")  # a working tree
    assert native.stale() == ["(no record of the build)"]
    native.record()
    assert native.stale() == []
    os.utime(relay / "flow.py", (2_000_000_000, 2_000_000_000))  # times alone say nothing
    assert native.stale() == []
    (state / "config.py").write_text("y = 3\n")  # a module whose types the compiled code read
    (relay / "new.py").write_text("")
    assert native.stale() == ["relay/new.py", "state/config.py"]


def test_the_relays_tests_pass_on_its_sources_too():
    """Where mypyc was missing when the package was built, the same modules run as source:
    the relay's unit tests pass that way as well (tests/pure_relay.py loads them so)."""
    tests = ["test_relay_loop.py", "test_relay_flow.py", "test_relay_routes.py",
             "test_relay_sniffing.py", "test_relay_hardening.py", "test_relay_ends.py",
             "test_relay_selector.py", "test_sniff_tls.py", "test_sniff_http.py",
             "test_routes.py", "test_domains.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.pure_relay",
                          "-p", "no:cacheprovider", *[f"tests/unit/{t}" for t in tests]],
                         cwd=REPO, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    sources = [line.split(": ", 1)[1] for line in out.stdout.splitlines()
               if line.startswith("relay module from: ")]
    assert len(sources) == len(native.COMPILED), out.stdout[-2000:]
    assert all(s.endswith(".py") for s in sources), out.stdout[-2000:]
