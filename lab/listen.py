"""A transparent listener: what the relay does, reduced to reporting addresses. Run inside a lab
namespace: `python -m lab listen PORT`."""

from __future__ import annotations

import selectors

from tproxyd.relay.listeners import open_listeners


def listen(port: int) -> None:
    """Accept TCP connections for any address on port (IPv4 and IPv6, IP_TRANSPARENT) and answer
    each HTTP request with the original destination (getsockname) and the client (getpeername)."""
    sel = selectors.DefaultSelector()
    for s in open_listeners(port, ("0.0.0.0", "::"), transparent=True, udp=False):
        sel.register(s, selectors.EVENT_READ)
    print(f"listening on port {port}", flush=True)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    local = conn.getsockname()
                    body = f"original-destination {local[0]} {local[1]}\nclient {peer[0]} {peer[1]}\n"
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
                    print(body.replace("\n", "; "), flush=True)
                except OSError as exc:
                    print(f"connection from {peer}: {exc}", flush=True)
