"""systemd's sd_notify protocol without a dependency: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence


class Notifier:
    """READY=1, RELOADING=1, STOPPING=1, STATUS=..., and the watchdog's interval, if any."""

    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + path[1:] if path.startswith("@") else path
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 2e6 if usec.isdigit() else None  # ping at half the interval
        self.status_sent: str | None = None

    def status(self, text: str, ready: bool = False) -> None:
        """STATUS=text, only when it changed; with READY=1 in the same datagram at start."""
        if ready:
            self.send(f"READY=1\nSTATUS={text}")
        elif text != self.status_sent:
            self.send(f"STATUS={text}")
        self.status_sent = text

    def send(self, message: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(message.encode(), self.addr)


def status_text(config_error: str | None, last: dict, intercepts: Sequence[str], workers: int,
                crash_loop: bool) -> str:
    """The one line `systemctl status` shows: what is in force now, worst news first. It
    follows every change, so a fixed file clears "config error" (issue 15)."""
    if config_error:
        text = f"config error, the last good config stays in force: {config_error.splitlines()[0]}"
    elif last.get("result") == "error":
        text = f"reconcile failed, retrying: {last.get('error', '')}"
    elif not intercepts:
        text = "nothing to intercept"
    else:
        text = f"converged: intercepting {', '.join(intercepts)}; {workers} relay worker(s)"
        if crash_loop:
            text += ", a worker is crash-looping"
    text = " ".join(text.split())  # one line, whatever the error said
    return text if len(text) <= 240 else text[:237] + "..."
