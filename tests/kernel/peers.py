"""Small TCP peers with one behaviour each, run inside the lab's namespaces by the relay tests.

    peers.py digest PORT        read to EOF, answer "<bytes> <sha256>", close (half-close peer)
    peers.py reset PORT         read a little, then close with RST
    peers.py echo PORT          echo every connection, many at once (selectors)
    peers.py hold HOST PORT N SECONDS   open N connections, check an echo on each, hold them
    peers.py late PORT SECONDS  answer a first line with "hi", SECONDS later send "late"
                                unasked, then echo (the server speaks first after a pause)
    peers.py talk HOST PORT     the client of `late`: prints each step as it goes
    peers.py udpecho PORT       echo every UDP datagram to its sender
    peers.py udpmany HOST PORT SOCKETS ROUNDS   each socket sends ROUNDS checked datagrams
"""

from __future__ import annotations

import hashlib
import resource
import selectors
import socket
import struct
import sys
import threading
import time


def listener(port: int) -> socket.socket:
    s = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=4096)
    print(f"listening on {port}", flush=True)
    return s


def digest(port: int) -> None:
    s = listener(port)

    def serve(conn: socket.socket) -> None:
        with conn:
            h, n = hashlib.sha256(), 0
            while data := conn.recv(65536):
                h.update(data)
                n += len(data)
            conn.sendall(f"{n} {h.hexdigest()}\n".encode())

    while True:
        conn, peer = s.accept()
        print(f"peer {peer[0]} {peer[1]}", flush=True)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def reset(port: int) -> None:
    s = listener(port)
    while True:
        conn, peer = s.accept()
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        print(f"reset {peer[0]}", flush=True)


def echo(port: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    s = listener(port)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except (BlockingIOError, ConnectionError):
                data = b""
            if data:
                conn.send(data)  # small messages: the socket buffer takes them whole
            else:
                sel.unregister(conn)
                conn.close()


def hold(host: str, port: int, count: int, seconds: float) -> None:
    """Open count connections, check each echoes, keep them all open for seconds."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    conns = []
    for i in range(count):
        c = socket.create_connection((host, port), timeout=10)
        conns.append(c)
        c.sendall(f"{i}\n".encode())
    for i, c in enumerate(conns):
        got = c.recv(64)
        assert got == f"{i}\n".encode(), f"connection {i}: expected its echo, got {got!r}"
    print(f"held {len(conns)}", flush=True)
    time.sleep(seconds)
    for c in conns:
        c.close()
    print("closed", flush=True)


def late(port: int, seconds: float) -> None:
    s = listener(port)
    while True:
        conn, _ = s.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"hi\n")
            time.sleep(seconds)
            conn.sendall(b"late\n")
            while data := conn.recv(100):
                conn.sendall(data)


def talk(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(b"hello\n")
        print("got", c.recv(100), flush=True)
        print("got", c.recv(100), flush=True)  # "late", sent by the server unasked
        c.sendall(b"more\n")
        print("got", c.recv(100), flush=True)


def udpecho(port: int) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    print(f"listening on {port}", flush=True)
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)


def udpmany(host: str, port: int, sockets: int, rounds: int) -> None:
    """Many client sockets at once, each expecting back exactly its own datagrams."""
    import os

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(sockets)]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    mixed = lost = 0
    for r in range(rounds):
        sent = {}
        for i in range(len(socks)):
            body = f"{i} {r} ".encode() + os.urandom(32)
            sent[i] = body + hashlib.sha256(body).digest()
        pending = set(sent)
        for _attempt in range(3):
            for i in pending:
                socks[i].sendto(sent[i], (host, port))
            deadline = time.monotonic() + 1.0
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(0.1):
                    i = key.data
                    try:
                        data = socks[i].recv(65536)
                    except BlockingIOError:
                        continue
                    sid, rnd = data.split(b" ", 2)[:2]
                    if data == sent[i]:
                        pending.discard(i)
                    elif int(sid) != i or int(rnd) == r:
                        mixed += 1  # another socket's datagram, or this round's corrupted
                    # else: a late copy from an earlier round's retry
            if not pending:
                break
        lost += len(pending)
    print(f"mixed {mixed} lost {lost}", flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "hold":
        hold(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "late":
        late(int(args[0]), float(args[1]))
    elif mode == "talk":
        talk(args[0], int(args[1]))
    elif mode == "udpmany":
        udpmany(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        {"digest": digest, "reset": reset, "echo": echo, "udpecho": udpecho}[mode](int(args[0]))
