"""Figures for the README's reliability section, not a test: status latency and a save's
convergence while the only worker is SIGSTOPped. As root, from the repository:

    .venv/bin/python -m tests.kernel.measure_status
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from lab import Lab
from tproxyd.reconciler.daemon import query

from .test_daemon import Tproxyd, config, dst4, timed_query, worker_pids


def main() -> None:
    with Lab(forwarding=True) as lab:
        d = Tproxyd(lab, config(lab))
        (pid,) = worker_pids(d)
        while not d.status()["counters"]:  # the worker's stats socket is up
            time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(6) as pool:
                latencies = sorted(t for t, _ in pool.map(lambda _: timed_query(d), range(6)))
            print("6 concurrent status answers:", ", ".join(f"{t:.2f}" for t in latencies), "s")
            t = time.monotonic()
            d.tproxy("status")
            print(f"tproxy status: {time.monotonic() - t:.2f}s")
            stop = threading.Event()

            def ask() -> None:
                while not stop.is_set():
                    query(d.socket, timeout=30)

            readers = [threading.Thread(target=ask) for _ in range(4)]
            for r in readers:
                r.start()
            t = time.monotonic()
            d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16"]'), "rename")
            while "198.19.0.0/16" not in dst4(lab):
                time.sleep(0.02)
            print(f"save converged with 4 readers asking: {time.monotonic() - t:.2f}s")
            stop.set()
            for r in readers:
                r.join()
        finally:
            os.kill(pid, signal.SIGCONT)


if __name__ == "__main__":
    main()
