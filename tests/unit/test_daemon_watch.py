"""The daemon watches the config before it reads it: an edit saved while the first converge
runs (before the loop) is taken at once, not at the next resync (30 s later)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tproxyd.reconciler import daemon as daemon_mod
from tproxyd.reconciler.daemon import Daemon


def body(tmp_path: Path, dst: str) -> str:
    return (f'[daemon]\nstate_dir = "{tmp_path.parent}/{tmp_path.name}-state"\nresync_interval = 3600\n\n'
            f'[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\ndestinations = ["{dst}"]\n')


def test_an_edit_during_the_first_converge_is_taken(tmp_path: Path, monkeypatch):
    path = tmp_path / "tproxy.toml"
    path.write_text(body(tmp_path, "198.18.2.0/24"))
    d = Daemon(str(path))
    converged: list[str] = []

    def converge() -> None:  # stands in for the kernel work; the first one meets an edit
        assert d.config is not None
        converged.append(str(d.config.intercepts[0].destinations[0]))
        if len(converged) == 1:
            path.write_text(body(tmp_path, "198.19.0.0/16"))
            time.sleep(0.3)  # the watcher's thread sees the edit while this converge runs

    monkeypatch.setattr(d, "_converge", converge)
    monkeypatch.setattr(d.supervisor, "start", lambda config: None)
    monkeypatch.setattr(d.signals, "install", lambda *a: None)  # signals: main thread only
    monkeypatch.setattr(daemon_mod.drift, "subscribe", lambda: [])
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    try:
        end = time.monotonic() + 5
        while "198.19.0.0/16" not in converged and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        d.running = False
        d._wake_w.send(b"x")
        loop.join(5)
    assert converged[0] == "198.18.2.0/24" and converged[-1] == "198.19.0.0/16", converged
