"""`python -m bench.spin`: loop turns and CPU of a relay with every descriptor of its process
taken while a stats reader waits (issue 11, item 4). Loopback, no root. With RELAY_TREE=DIR
and `python -S`, an older tree's relay (see bench/reliability.py)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import tempfile
import threading
import time

from tproxyd.relay.loop import Relay, Settings


def main() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    path = os.path.join(tempfile.mkdtemp(), "relay.sock")
    relay = Relay(Settings(port=0, hosts=("127.0.0.1",), transparent=False, spoof_source=False,
                           stats_path=path), original_dst=lambda s: upstream.getsockname())
    (addr,) = relay.open()
    threading.Thread(target=relay.run, daemon=True).start()
    client, reader = socket.socket(), socket.socket(socket.AF_UNIX)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
    fillers = []
    with contextlib.suppress(OSError):
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    client.connect(addr)  # its accept fails: the relay is short
    time.sleep(0.5)
    reader.settimeout(3)
    reader.connect(path)
    try:
        answered = bool(reader.recv(1 << 16))
    except OSError:
        answered = False
    turns, cpu = relay.iterations, time.process_time()
    time.sleep(2.0)
    print(json.dumps({"figure": "spin", "stats_answered": answered,
                      "loop_turns_per_s": round((relay.iterations - turns) / 2.0),
                      "process_cpu_per_s": round((time.process_time() - cpu) / 2.0, 3)}))
    for fd in fillers:
        os.close(fd)


if __name__ == "__main__":
    main()
