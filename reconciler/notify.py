"""systemd's sd_notify protocol without a dependency: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """READY=1, RELOADING=1, STOPPING=1, STATUS=..., and the watchdog's interval, if any."""

    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + path[1:] if path.startswith("@") else path
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 2e6 if usec.isdigit() else None  # ping at half the interval

    def send(self, message: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(message.encode(), self.addr)
