"""Root-only Unix sockets that answer one JSON document per connection: the relay's counters and
the daemon's status are read this way without stopping either loop."""

from __future__ import annotations

import contextlib
import json
import os
import socket


def listen(path: str) -> socket.socket:
    """A non-blocking listener at path, mode 0600 (a stale socket file is replaced)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except BaseException:
        s.close()
        raise
    finally:
        os.umask(old)
    s.listen(16)
    s.setblocking(False)
    return s


def answer(listener: socket.socket, document: dict, timeout: float = 0.0) -> None:
    """Accept one reader and send it the document. A reader that does not read loses its answer,
    not the caller's loop (timeout 0: never wait)."""
    try:
        peer, _ = listener.accept()
    except OSError:
        return
    reply(peer, document, timeout)


def reply(peer: socket.socket, document: dict, timeout: float = 0.0) -> None:
    """Send an accepted reader the document and close it; never raises."""
    with peer:
        peer.settimeout(timeout)
        with contextlib.suppress(OSError):
            peer.sendall(json.dumps(document).encode() + b"\n")


def ask(path: str, timeout: float = 2.0, request: bytes = b"") -> dict:
    """The document the listener at path answers with (after reading request, if any: the
    daemon's status socket takes a request line)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        if request:
            s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
