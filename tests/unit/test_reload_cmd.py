"""`tproxy reload` (the unit's ExecReload): a broken file is refused with its own error and the
daemon is not signalled; a good one is signalled and the command waits for the reconcile."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import List, Tuple

import pytest

from tproxyd.reconciler import cli, reload_cmd
from tproxyd.state.loader import load

GOOD = '[daemon]\nsocket = "/nonexistent/tproxyd.sock"\n'


@dataclass
class FakeDaemon:
    """Answers on its socket like tproxyd; SIGHUP makes its next answer show one more reconcile
    (or the error it would hit), as the real loop does after re-reading the file."""

    pid: int = 4242
    reconciles: int = 3
    reload_result: dict = field(default_factory=lambda: {"result": "ok", "changes": ["+ x"]})
    answers_after_hup: bool = True
    signals: List[Tuple[int, int]] = field(default_factory=list)
    last: dict = field(default_factory=lambda: {"result": "ok", "changes": []})

    def ask(self, path: str) -> dict:
        assert path == "/nonexistent/tproxyd.sock"
        return {"pid": self.pid, "reconciles": self.reconciles, "last_reconcile": self.last,
                "config_error": None}

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        if self.answers_after_hup:
            self.reconciles += 1
            self.last = self.reload_result


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text(GOOD)
    return load(str(path))


def test_signals_mainpid_and_waits_for_the_reconcile(config, capsys):
    daemon = FakeDaemon()
    assert reload_cmd.reload(config, mainpid="777", ask=daemon.ask, kill=daemon.kill, poll=0) == 0
    assert daemon.signals == [(777, signal.SIGHUP)]
    assert "reloaded" in capsys.readouterr().out


def test_without_mainpid_the_socket_names_the_daemon(config, monkeypatch):
    monkeypatch.delenv("MAINPID", raising=False)
    daemon = FakeDaemon()
    assert reload_cmd.reload(config, ask=daemon.ask, kill=daemon.kill, poll=0) == 0
    assert daemon.signals == [(4242, signal.SIGHUP)]


def test_a_failed_converge_after_reload_is_an_error(config, capsys):
    daemon = FakeDaemon(reload_result={"result": "error", "error": "nft: boom", "changes": []})
    assert reload_cmd.reload(config, mainpid="1", ask=daemon.ask, kill=daemon.kill, poll=0) == 1
    assert "nft: boom" in capsys.readouterr().err


def test_no_reconcile_in_time_is_an_error(config, capsys):
    daemon = FakeDaemon(answers_after_hup=False)
    assert reload_cmd.reload(config, mainpid="1", ask=daemon.ask, kill=daemon.kill, poll=0,
                             timeout=0.05) == 1
    assert "no reconcile seen" in capsys.readouterr().err


def test_no_daemon_is_an_error(config, capsys):
    def ask(path: str) -> dict:
        raise FileNotFoundError(path)

    assert reload_cmd.reload(config, ask=ask, kill=pytest.fail) == 1
    assert "does not answer" in capsys.readouterr().err


def test_a_broken_file_is_refused_with_its_own_error_before_any_signal(tmp_path, capsys,
                                                                       monkeypatch):
    """Issue 15 item 3: `kill -HUP` returned 0 for a broken file."""
    monkeypatch.setattr(reload_cmd, "reload", pytest.fail)
    bad = tmp_path / "t.toml"
    bad.write_text("[relay]\nport = 70000\n")
    assert cli.main(["reload", "-c", str(bad)]) == 1
    assert f"{bad}: relay.port" in capsys.readouterr().err
