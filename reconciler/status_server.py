"""The daemon's status socket (mode 0600, `[daemon] socket`): `tproxy status` connects and reads
one JSON document."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

from tproxyd.relay import unixsock


class StatusServer:
    def __init__(self, path: str, document: Callable[[], dict]):
        self.path = path
        self.document = document
        self.listener: socket.socket | None = None

    def open(self) -> socket.socket:
        self.listener = unixsock.listen(self.path)
        return self.listener

    def on_readable(self) -> None:
        assert self.listener is not None
        unixsock.answer(self.listener, self.document(), timeout=2)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
