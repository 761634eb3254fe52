"""Asking workers for counters without blocking: a worker that answers, one that never does."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import time
from pathlib import Path

from tproxyd.reconciler import worker_stats
from tproxyd.reconciler.status_server import FRESH_WAIT, StatusServer
from tproxyd.reconciler.supervisor import Worker
from tproxyd.relay import unixsock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def worker(tmp_path: Path, name: str) -> tuple[Worker, socket.socket]:
    """A stand-in worker: a real process for its pid, and a stats listener the test drives."""
    path = str(tmp_path / f"{name}.sock")
    listener = unixsock.listen(path)
    proc = subprocess.Popen(["sleep", "60"])
    return Worker(0, proc, path, time.monotonic()), listener


def run(sel: selectors.BaseSelector, until, turns: int = 50) -> None:
    for _ in range(turns):
        if until():
            return
        for key, _ in sel.select(0.05):
            key.data()
    raise AssertionError("not done")


def test_an_answering_worker_reports_and_a_silent_one_times_out(tmp_path: Path):
    sel, clock, reports = selectors.DefaultSelector(), Clock(), []
    poller = worker_stats.StatsPoller(sel, clock, lambda w, r, t: reports.append((w, r, t)))
    talker, talker_listener = worker(tmp_path, "talker")
    silent, silent_listener = worker(tmp_path, "silent")  # accepts nothing, as if SIGSTOPped
    try:
        poller.ask([talker, silent])
        assert not poller.idle
        unixsock.answer(talker_listener, {"pid": 1, "accepted": 7})
        run(sel, lambda: len(reports) == 1)
        assert reports == [(talker, {"pid": 1, "accepted": 7}, 100.0)]
        assert not poller.idle and poller.expire() == 100.0 + worker_stats.STATS_TIMEOUT
        clock.now += worker_stats.STATS_TIMEOUT
        assert poller.expire() is None and poller.idle  # given up on; nothing blocked
        poller.ask([silent])
        poller.ask([silent])  # a periodic round leaves the pending question alone
        assert len(poller.requests) == 1
    finally:
        poller.close()
        for w, listener in ((talker, talker_listener), (silent, silent_listener)):
            listener.close()
            w.proc.kill()
            w.proc.wait()


def test_status_answers_readers_without_waiting_on_a_silent_worker(tmp_path: Path):
    sel, clock = selectors.DefaultSelector(), Clock()
    poller = worker_stats.StatsPoller(sel, clock, lambda w, r, t: None)
    silent, silent_listener = worker(tmp_path, "silent")
    server = StatusServer(str(tmp_path / "status.sock"), sel, clock, lambda: {"ok": True},
                          refresh=lambda: poller.ask([silent], again=True),
                          fresh=lambda: poller.idle)
    server.open()
    readers = []
    try:
        for _ in range(5):
            r = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            r.connect(server.path)
            readers.append(r)
        run(sel, lambda: len(server.readers) == 5)
        assert server.tick() == 100.0 + FRESH_WAIT  # waiting for fresh counters, briefly
        clock.now += FRESH_WAIT
        server.tick()  # the wait is over: everyone is answered from what is known
        for r in readers:
            r.settimeout(5)
            assert json.loads(r.recv(65536)) == {"ok": True}
        assert server.readers == []
    finally:
        for r in readers:
            r.close()
        server.close()
        poller.close()
        silent_listener.close()
        silent.proc.kill()
        silent.proc.wait()


def test_a_final_report_arrives_through_the_exit_pipe(tmp_path: Path):
    sel, clock, reports = selectors.DefaultSelector(), Clock(), []
    poller = worker_stats.StatsPoller(sel, clock, lambda w, r, t: reports.append((w, r)))
    quitter, listener = worker(tmp_path, "quitter")
    killed, listener2 = worker(tmp_path, "killed")
    try:
        for w in (quitter, killed):
            w.report_fd, write_end = os.pipe()
            poller.watch_exit(w)
            assert w.report_fd is None  # the poller owns it now
            if w is quitter:
                os.write(write_end, b'{"pid": 1, "accepted": 9}')
            os.close(write_end)  # the worker is gone
        run(sel, lambda: not poller.exits)
        assert reports == [(quitter, {"pid": 1, "accepted": 9})]  # killed: nothing to report
    finally:
        poller.close()
        for w, stats in ((quitter, listener), (killed, listener2)):
            stats.close()
            w.proc.kill()
            w.proc.wait()


def test_a_top_request_is_answered_with_the_top_document_and_status_stays_the_default(
        tmp_path: Path):
    from tproxyd.reconciler.status_server import Kind

    sel, clock = selectors.DefaultSelector(), Clock()
    asked = []
    server = StatusServer(str(tmp_path / "status.sock"), sel, clock, lambda: {"status": 1},
                          refresh=lambda: None, fresh=lambda: True,
                          top=Kind(lambda: {"top": 1}, refresh=lambda: asked.append(1),
                                   fresh=lambda: bool(asked)))
    server.open()
    readers = {}
    try:
        for request in (b"top\n", b"status\n", b"", b"bogus\n"):
            r = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            r.connect(server.path)
            if request:
                r.sendall(request)
            readers[request] = r
        run(sel, lambda: len(server.readers) == 4 and sum(
            x.kind is not None for x in server.readers) == 3)
        server.tick()  # top and status are fresh: answered now; the silent one waits
        assert asked == [1]
        for request in (b"top\n", b"status\n", b"bogus\n"):
            readers[request].settimeout(5)
            want = {"top": 1} if request == b"top\n" else {"status": 1}
            assert json.loads(readers[request].recv(65536)) == want, request
        assert len(server.readers) == 1
        clock.now += FRESH_WAIT
        server.tick()
        readers[b""].settimeout(5)
        assert json.loads(readers[b""].recv(65536)) == {"status": 1}
    finally:
        for r in readers.values():
            r.close()
        server.close()
