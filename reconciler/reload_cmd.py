"""`tproxy reload`: what the unit's ExecReload runs. The caller (main) has already validated the
file and exited 1 with its own error when it is broken, so a broken reload is refused visibly
and the daemon is never asked to read it. Then: SIGHUP to the daemon, and wait until the status
socket shows a reconcile that started after the signal, reporting how it ended.

Self-contained on purpose (no procps: systemd passes $MAINPID; otherwise the daemon's pid comes
from its status socket)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

from tproxyd.state.config import Config

EXIT_OK, EXIT_ERROR = 0, 1

Ask = Callable[[str], dict]
Kill = Callable[[int, int], None]


def _ask(path: str) -> dict:
    from .daemon import query  # the daemon's own reader of its socket

    return query(path, timeout=5.0)


def reload(config: Config, *, timeout: float = 60.0, mainpid: str | None = None,
           ask: Ask = _ask, kill: Kill = os.kill, poll: float = 0.2,
           clock: Callable[[], float] = time.monotonic) -> int:
    """Signal the daemon serving config.daemon.socket_path and wait for the reload to show."""
    path = config.daemon.socket_path
    try:
        before = ask(path)
    except (OSError, ValueError) as exc:
        print(f"tproxy reload: the daemon does not answer on {path}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    pid_text = mainpid if mainpid is not None else os.environ.get("MAINPID", "")
    pid = int(pid_text) if pid_text.isdigit() else int(before["pid"])
    count = int(before.get("reconciles", 0))
    kill(pid, signal.SIGHUP)
    deadline = clock() + timeout
    while clock() < deadline:
        time.sleep(poll)
        try:
            view = ask(path)
        except (OSError, ValueError):
            continue  # busy reconciling, or its socket is being replaced: ask again
        if view.get("config_error"):  # the file changed again after we checked it
            print(f"tproxy reload: the daemon refused the config:\n{view['config_error']}",
                  file=sys.stderr)
            return EXIT_ERROR
        if int(view.get("reconciles", 0)) > count:
            last = view.get("last_reconcile") or {}
            if last.get("result") == "error":
                print(f"tproxy reload: config loaded, converging failed (the daemon retries): "
                      f"{last.get('error', '')}", file=sys.stderr)
                return EXIT_ERROR
            print(f"reloaded {config.source}: {len(last.get('changes', []))} changes")
            return EXIT_OK
    print(f"tproxy reload: no reconcile seen within {timeout:.0f}s of SIGHUP to pid {pid}",
          file=sys.stderr)
    return EXIT_ERROR
