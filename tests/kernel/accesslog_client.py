"""One TCP client behaviour per mode, run in the lab's client namespace by test_accesslog.py.
Prints "sent N got M" (bytes), then how the connection ended for it.

    accesslog_client.py MODE HOST PORT
    fin      send 1000 bytes, shut down writing, read to EOF
    read     send 2 bytes, read to EOF (the server closes first)
    creset   send 500 bytes, read the 500 echoed, close with RST
    sreset   send 5 bytes, read until the reset
    idle     send 2 bytes, read the 2 echoed, wait for the relay's reset
    refused  send nothing, read until the reset
"""

from __future__ import annotations

import socket
import struct
import sys


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        c = socket.create_connection((host, port), timeout=20)
    except (ConnectionResetError, ConnectionRefusedError):  # the relay's RST beat the handshake
        print("sent 0 got 0 reset", flush=True)
        return
    sent = got = 0
    how = "eof"
    payload = {"fin": 1000, "read": 2, "creset": 500, "sreset": 5, "idle": 2}.get(mode, 0)
    c.sendall(b"x" * payload)
    sent = payload
    if mode == "fin":
        c.shutdown(socket.SHUT_WR)
    try:
        while True:
            if mode == "creset" and got == payload:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                how = "reset sent"
                break
            data = c.recv(65536)
            if not data:
                break
            got += len(data)
    except ConnectionResetError:
        how = "reset"
    print(f"sent {sent} got {got} {how}", flush=True)


if __name__ == "__main__":
    main()
