"""The daemon's relay workers: child processes, restarted with capped backoff, reloaded without
dropping a connection.

The daemon makes the listening sockets and keeps them; each worker inherits one set (several
sets with SO_REUSEPORT when relay.workers > 1). A reload starts new workers on the same sockets,
then tells the old ones to drain (SIGUSR2: stop accepting, exit when their connections end),
so a connection is always either in a live worker or in the shared accept queue.

Each worker also inherits the last good config's bytes (a sealed memfd) and a pipe for its final
counters. The supervisor keeps the counters each worker last reported and the totals of the
workers that ended, so the sum it reports never goes down.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tproxyd.relay.listeners import open_listeners
from tproxyd.state.config import TPROXY, Config

log = logging.getLogger("tproxyd")

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 30.0  # seconds before restarting a worker that died
CRASH_LOOP = 5  # this many unexpected exits within a minute is reported as a crash loop
# What workers report "now" rather than "so far": summed over live workers only. Every other
# integer a worker reports is a running total, kept when the worker ends.
GAUGES = frozenset({"active", "udp_sessions", "pipe_memory", "udp_held"})
# per upstream: upstream_<name>_active (connections open through it now) and upstream_<name>_up
# (1 where that worker has it up: summed, "up in k of n workers")
UPSTREAM_GAUGES = ("_active", "_up")


def is_gauge(key: str) -> bool:
    return key in GAUGES or (key.startswith("upstream_") and key.endswith(UPSTREAM_GAUGES))


def worker_count(config: Config) -> int:
    """No intercept, no relay: the shipped config must leave the host as it was, listeners
    included (issue 15)."""
    if not config.intercepts:
        return 0
    return config.relay.workers or len(os.sched_getaffinity(0))


def listener_shape(config: Config) -> tuple:
    """What the listening sockets depend on: a change here needs new sockets."""
    r = config.relay
    return (r.port, r.mode == TPROXY, config.relays_udp, worker_count(config))


@dataclass
class Worker:
    slot: int
    proc: subprocess.Popen
    stats: str
    started: float
    draining: bool = False
    drain_deadline: float = 0.0
    terminated: bool = False  # SIGTERM sent after drain_timeout; SIGKILL next
    last: dict = field(default_factory=dict)  # the counters it last reported
    last_at: float | None = None  # monotonic time of that report
    report_fd: int | None = None  # a pipe the worker writes its final counters to as it exits

    def info(self, now: float) -> dict:
        age = None if self.last_at is None else round(now - self.last_at, 1)
        return {"slot": self.slot, "pid": self.proc.pid, "uptime": round(now - self.started, 1),
                "state": "draining" if self.draining else "serving", "stats": self.stats,
                "counters_age": age}


@dataclass
class Slot:
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times of unexpected exits
    restart_at: float | None = None
    last_exit: str = ""


def sealed_memfd(data: bytes, name: str) -> int:
    """A read-only in-memory file holding data: sealed, so neither we nor a child can change
    it, and in no directory, so nothing else can swap it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Supervisor:
    def __init__(self, config_path: str):
        self.config_path = config_path  # names the config in the workers' messages
        self.config_fd: int | None = None  # the last good config's bytes, handed to workers
        self.config: Config | None = None
        self.sockets: list[list[socket.socket]] = []  # per slot
        self.shape: tuple = ()
        self.workers: list[Worker] = []
        self.slots: list[Slot] = []
        self.generation = 0
        self.retired: dict[str, int] = {}  # the totals of workers that ended
        # takes each new worker's report_fd (the daemon reads it in its loop); without one,
        # nobody reads the final report and the pipe is closed at once
        self.on_spawn: Callable[[Worker], None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def keep_config(self, raw: bytes) -> None:
        """The bytes workers (re)start from: the last good config, never a file that a person
        may have just broken, and no file in state_dir for anyone to replace."""
        fd = sealed_memfd(raw, "tproxyd-config")
        if self.config_fd is not None:
            os.close(self.config_fd)
        self.config_fd = fd

    def start(self, config: Config) -> None:
        self.config = config
        self._open_sockets(config)
        for slot in range(len(self.sockets)):
            self._spawn(slot)

    def reload(self, config: Config) -> None:
        """New workers on (possibly new) sockets first, then the old ones drain."""
        old_workers = [w for w in self.workers if not w.draining]
        old_sockets = self.sockets
        if listener_shape(config) != self.shape:
            self._open_sockets(config)  # may fail (port taken): nothing has changed yet
        self.config = config
        self.generation += 1
        for slot in self.slots:
            slot.restart_at = None  # the new generation replaces a worker waiting to restart
        for slot in range(len(self.sockets)):
            self._spawn(slot)
        now = time.monotonic()
        for w in old_workers:
            self._drain(w, now)
        if old_sockets is not self.sockets:
            # Close our copies now: once the draining workers close theirs, the old sockets
            # leave the SO_REUSEPORT group and new connections only reach the new ones.
            self._close_sockets(old_sockets)

    def stop(self, timeout: float) -> None:
        """Drain every worker, then SIGTERM what is left after timeout, then SIGKILL."""
        now = time.monotonic()
        for w in self.workers:
            if not w.draining:
                self._drain(w, now)
        deadline = now + timeout
        for w in list(self.workers):
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.terminate()
                try:
                    w.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
            self._forget(w)
        self._close_sockets(self.sockets)
        self.sockets = []
        if self.config_fd is not None:
            os.close(self.config_fd)
            self.config_fd = None

    # --- the daemon's loop calls these -----------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Reap exits, restart due slots, enforce drain deadlines. Returns the next deadline."""
        for w in list(self.workers):
            code = w.proc.poll()
            if code is None:
                if w.draining and now >= w.drain_deadline:
                    if w.terminated:
                        w.proc.kill()
                    else:
                        log.warning("worker %s (pid %s) still has connections after "
                                    "drain_timeout: stopping it", w.slot, w.proc.pid)
                        w.proc.terminate()
                        w.terminated = True
                    w.drain_deadline = now + 5
                continue
            self._forget(w)
            if w.draining:
                log.info("worker %s (pid %s) drained and exited", w.slot, w.proc.pid)
                continue
            self._died(w, code, now)
        for slot_no, slot in enumerate(self.slots):
            if slot.restart_at is not None and now >= slot.restart_at and self.config is not None:
                slot.restart_at = None
                if slot_no < len(self.sockets):
                    self._spawn(slot_no)
        deadlines = [s.restart_at for s in self.slots if s.restart_at is not None]
        deadlines += [w.drain_deadline for w in self.workers if w.draining]
        return min(deadlines) if deadlines else None

    def info(self, now: float) -> dict:
        workers = []
        for w in self.workers:
            entry = w.info(now)
            entry["restarts"] = self.slots[w.slot].restarts if w.slot < len(self.slots) else 0
            workers.append(entry)
        crash = [n for n, s in enumerate(self.slots) if self._crash_looping(s, now)]
        return {"workers": workers, "crash_loop": crash,
                "last_exits": {n: s.last_exit for n, s in enumerate(self.slots) if s.last_exit}}

    def counters(self) -> dict[str, int]:
        """Every integer counter the workers report, summed: the live workers' latest reports
        plus the totals of those that ended, so no total ever goes down. No I/O: the reports
        are collected by worker_stats.StatsPoller."""
        total = dict(self.retired)
        for w in self.workers:
            for key, value in counts(w.last).items():
                total[key] = total.get(key, 0) + value
        return total

    def report(self, w: Worker, report: dict, now: float) -> None:
        """A worker's counters arrived. One that ended meanwhile adds what it counted since
        its previous report to the retired totals."""
        if w not in self.workers:
            before = counts(w.last)
            for key, value in counts(report).items():
                if not is_gauge(key):
                    self.retired[key] = self.retired.get(key, 0) + max(0, value - before.get(key, 0))
        w.last, w.last_at = report, now

    # --- internals -----------------------------------------------------------------------------

    def _open_sockets(self, config: Config) -> None:
        count = worker_count(config)
        shape = listener_shape(config)
        sets = []
        try:
            for _ in range(count):
                sets.append(open_listeners(config.relay.port, ("0.0.0.0", "::"), shape[1], shape[2],
                                           reuseport=True))
        except BaseException:
            self._close_sockets(sets)
            raise
        self.sockets, self.shape = sets, shape
        while len(self.slots) < count:
            self.slots.append(Slot())

    @staticmethod
    def _close_sockets(sets: list[list[socket.socket]]) -> None:
        for group in sets:
            for s in group:
                s.close()

    def _spawn(self, slot: int) -> None:
        assert self.config is not None
        state = self.config.daemon.state_dir
        stats = os.path.join(state, f"relay-{slot}-{self.generation}-{time.monotonic_ns()}.sock")
        assert self.config_fd is not None
        fds = [s.fileno() for s in self.sockets[slot]]
        report_r, report_w = os.pipe()
        args = [sys.executable, "-m", "tproxyd.relay", "--config", self.config_path,
                "--config-fd", str(self.config_fd), "--report-fd", str(report_w),
                "--stats", stats, "--name", f"relay{slot}"]
        for fd in fds:
            args += ["--listen-fd", str(fd)]
        try:
            proc = subprocess.Popen(args, pass_fds=[*fds, self.config_fd, report_w],
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        w = Worker(slot, proc, stats, time.monotonic(), report_fd=report_r)
        self.workers.append(w)
        log.info("worker %s started (pid %s)", slot, proc.pid)
        if self.on_spawn is not None:
            self.on_spawn(w)
        else:
            os.close(report_r)
            w.report_fd = None

    def _forget(self, w: Worker) -> None:
        if w in self.workers:
            self.workers.remove(w)
            for key, value in counts(w.last).items():
                self.retired[key] = self.retired.get(key, 0) + (0 if is_gauge(key) else value)
        with contextlib.suppress(OSError):
            os.unlink(w.stats)  # a killed worker could not remove its own

    def _drain(self, w: Worker, now: float) -> None:
        assert self.config is not None
        w.draining = True
        w.drain_deadline = now + self.config.relay.drain_timeout
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGUSR2)

    def _died(self, w: Worker, code: int, now: float) -> None:
        slot = self.slots[w.slot]
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        slot.last_exit = how
        # the backoff grows with the deaths of the last minute: a worker that stays up for a
        # minute starts again from the first step
        slot.deaths = [t for t in slot.deaths if now - t < 60] + [now]
        slot.restarts += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(slot.deaths) - 1))
        slot.restart_at = now + delay
        level = logging.ERROR if self._crash_looping(slot, now) else logging.WARNING
        log.log(level, "worker %s (pid %s) %s after %.1fs; restarting in %.1fs%s", w.slot,
                w.proc.pid, how, now - w.started, delay,
                " (crash loop)" if self._crash_looping(slot, now) else "")

    @staticmethod
    def _crash_looping(slot: Slot, now: float) -> bool:
        return len([t for t in slot.deaths if now - t < 60]) >= CRASH_LOOP


def counts(report: dict) -> dict[str, int]:
    """The counters in a worker's report: its integers but its pid (bools are not counts)."""
    return {k: v for k, v in report.items()
            if k != "pid" and isinstance(v, int) and not isinstance(v, bool)}
