"""Signals as events of the daemon's loop: the handler only queues the number, and Python's
wakeup fd makes the loop's select() return."""

from __future__ import annotations

import signal
from collections.abc import Iterable


class SignalQueue:
    def __init__(self) -> None:
        self.pending: list[int] = []

    def install(self, signums: Iterable[int], wakeup_fd: int) -> None:
        for sig in signums:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)  # handled in the loop, not here

    def pop(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken
