"""`tproxyd`: converge to tproxy.toml, keep converging, and supervise the relay.

One loop (selectors) waits on: signals (signals.py), config file events (watch.py, debounced),
netlink notifications for rules, routes and nftables (drift.py), the status socket
(status_server.py), Prometheus scrapes (metrics_server.py, metrics.py), and timers (debounce,
periodic resync, worker restarts, the systemd watchdog: notify.py). This file holds the loop and
what it decides: when to reconcile, when a config is taken, when the workers are replaced
(supervisor.py runs them). A bad config is logged and shown in status while the last good one
stays in force; a kernel error is retried with backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

from prometheus_client.exposition import choose_encoder

from tproxyd.relay import unixsock
from tproxyd.relay.listing import TOP_ROWS, listing_socket
from tproxyd.state.config import DEFAULT_CONFIG_PATH, Config
from tproxyd.state.config import Daemon as DaemonConfig
from tproxyd.state.desired import owner_of
from tproxyd.state.errors import ConfigError, Problem
from tproxyd.state.loader import from_bytes

from . import drift, metrics, upstream_health
from .config_file import ConfigFile, Settled, Unreadable, Unsettled
from .errors import KernelError, PreflightError
from .metrics_server import MetricsServer
from .notify import Notifier, status_text
from .reconcile import Reconciler
from .signals import SignalQueue
from .status_server import Kind, StatusServer
from .supervisor import Supervisor, Worker, listener_shape
from .watch import ConfigWatcher
from .worker_stats import StatsPoller

log = logging.getLogger("tproxyd")

DEBOUNCE = 0.2  # seconds of quiet after a file or netlink event before reconciling
DEBOUNCE_MAX = 1.0  # a steady stream of events still converges this soon
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
STATS_INTERVAL = 1.0  # the workers' counters are collected this often (a drained worker's
# last second of counting is what the totals can miss)


class Daemon:
    def __init__(self, path: str):
        self.path = path
        self.config: Config | None = None  # the last good config, in force
        self.config_digest = ""  # of the settled bytes last looked at, good or bad
        self.config_error: str | None = None
        self.file = ConfigFile(path, DaemonConfig().settle)  # the loaded config's settle, later
        self.settle_at: float | None = None  # when to read an unsettled file again
        self.reload_requested = False  # SIGHUP: take the file and replace the workers
        self.reconciler: Reconciler | None = None
        self.supervisor = Supervisor(path)
        self.notifier = Notifier()
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, str]] = []
        self.reconcile_due: tuple[float, float] | None = None  # (when, first event's time)
        self.retry_delay = RETRY_FIRST
        self.running = True
        self.signals = SignalQueue()
        self.file_event = False
        self.started = time.time()
        self.reconciles = 0
        self.last: dict = {}
        self.counts = metrics.DaemonCounts()  # reconciles by result, their durations, repairs
        self.converged: Config | None = None  # the config last converged to without error
        self.config_loaded_at = 0.0  # Unix time the config in force was loaded
        self.metrics_server: MetricsServer | None = None
        self.metrics_error: str | None = None  # why the endpoint is not open
        self.registry = metrics.registry(self.metrics_snapshot)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._on_read(self._wake_r, self._drain_wake)
        self.stats = StatsPoller(self.selector, time.monotonic, self.supervisor.report)
        # `tproxy top`: the workers' connection lists, asked for only while someone looks
        self.listings: dict[int, dict] = {}
        self.lister = StatsPoller(self.selector, time.monotonic, self._on_listing,
                                  make_socket=listing_socket)
        self.supervisor.on_spawn = self.stats.watch_exit
        self.status_server: StatusServer | None = None
        self.watcher = ConfigWatcher(path, self._on_file_event)

    # --- start and stop ------------------------------------------------------------------------

    def run(self) -> int:
        # watch first, read second: an edit saved while the first converge runs is seen, not
        # left for the next resync
        self.watcher.start()
        try:
            settled = self._wait_until_settled()
            self.config = from_bytes(settled.raw, self.path)
            self.config_loaded_at = time.time()
            self.config_digest = settled.digest
            self.file.settle = self.config.daemon.settle
            self._keep_for_workers(settled.raw, self.config)
        except ConfigError as exc:
            log.error("%s", exc)
            self.watcher.stop()
            return 1
        except OSError as exc:
            log.error("cannot keep a copy of the config for the workers: %s", exc)
            self.watcher.stop()
            return 1
        self.signals.install((signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD),
                             self._wake_w.fileno())
        self._reconcile(initial=True)
        try:
            self.supervisor.start(self.config)
        except OSError as exc:
            log.error("cannot open the relay's listeners on port %s: %s", self.config.relay.port, exc)
            self._exit_cleanup()
            return 1
        for sock in drift.subscribe():
            self._on_read(sock, lambda s=sock: (drift.drain(s), self._schedule_reconcile()))
        self.status_server = StatusServer(
            self.config.daemon.socket_path, self.selector, time.monotonic, self.status,
            refresh=lambda: self.stats.ask(self.supervisor.workers, again=True),
            fresh=lambda: self.stats.idle,
            top=Kind(self.top, refresh=lambda: self.lister.ask(self.supervisor.workers, again=True),
                     fresh=lambda: self.lister.idle))
        self.status_server.open()
        self._open_metrics()
        self._at(time.monotonic() + self.config.daemon.resync_interval, "resync")
        self._at(time.monotonic() + STATS_INTERVAL, "stats")
        if self.notifier.watchdog:
            self._at(time.monotonic() + self.notifier.watchdog, "watchdog")
        self._tell_status(ready=True)
        log.info("tproxyd running (pid %s), config %s", os.getpid(), self.path)
        try:
            while self.running:
                self._turn()
        finally:
            self._exit_cleanup()
        return 0

    def _wait_until_settled(self) -> Settled:
        """At start there is no loop yet and nothing in force: wait here."""
        while True:
            outcome = self.file.check(time.monotonic())
            if isinstance(outcome, Settled):
                return outcome
            if isinstance(outcome, Unreadable):
                exc = outcome.error
                raise ConfigError(self.path, [Problem(f"cannot read: {exc.strerror or exc}")])
            time.sleep(max(0.0, outcome.check_again_at - time.monotonic()))

    def _exit_cleanup(self) -> None:
        self.notifier.send("STOPPING=1")
        self.watcher.stop()
        assert self.config is not None
        log.info("stopping: draining the relay workers")
        try:
            self.supervisor.stop(self.config.relay.drain_timeout)
        except Exception:  # removing our rules matters more
            log.exception("stopping the workers")
        if self.config.daemon.on_exit == "remove":
            rec = self.reconciler or Reconciler(self.config)
            try:
                result = rec.down()
                log.info("removed what tproxyd owned (%d changes)", len(result.ops))
            except KernelError as exc:
                log.error("could not remove everything: %s", exc)
        else:
            log.info("on_exit = keep: rules left in force")
        if self.status_server is not None:
            self.status_server.close()
        self._close_metrics()
        self.stats.close()
        self.lister.close()

    # --- the loop ------------------------------------------------------------------------------

    def _on_read(self, fileobj: socket.socket, handler: Callable[[], object]) -> None:
        """Each registered object carries its handler: the loop only calls it."""
        self.selector.register(fileobj, selectors.EVENT_READ, handler)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _on_file_event(self) -> None:
        """watchdog's thread: only flag and wake."""
        self.file_event = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"f")

    def _turn(self) -> None:
        now = time.monotonic()
        deadlines = [t for t, _ in self.timers[:1]]
        if self.reconcile_due:
            deadlines.append(self.reconcile_due[0])
        if self.settle_at is not None:
            deadlines.append(self.settle_at)
        for nxt in (self.supervisor.tick(now), self.stats.expire(), self.lister.expire(),
                    self.status_server.tick() if self.status_server else None,
                    self.metrics_server.tick() if self.metrics_server else None):
            if nxt is not None:
                deadlines.append(nxt)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in self.selector.select(timeout):
            key.data()
        self._handle_signals()
        if self.file_event:
            self.file_event = False
            self._schedule_reconcile()
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, what = heapq.heappop(self.timers)
            if what == "resync":
                self._schedule_reconcile(now=True)
                assert self.config is not None
                self._at(now + self.config.daemon.resync_interval, "resync")
                if self.metrics_server is None and self.config.metrics.enabled:
                    self._open_metrics()  # its address was taken or not yet configured: again
            elif what == "watchdog":
                self.notifier.send("WATCHDOG=1")
                self._at(now + (self.notifier.watchdog or 1), "watchdog")
            elif what == "stats":
                self.stats.ask(self.supervisor.workers)
                self._at(now + STATS_INTERVAL, "stats")
        if self.reconcile_due and now >= self.reconcile_due[0]:
            self.reconcile_due = None
            self._reconcile()
        elif self.settle_at is not None and now >= self.settle_at:
            self.settle_at = None
            if self._take_file():  # look at the file again; converge only if it was taken
                self._converge()
        self._tell_status()

    def _tell_status(self, ready: bool = False) -> None:
        assert self.config is not None
        self.notifier.status(ready=ready, text=status_text(
            self.config_error, self.last, [i.name for i in self.config.intercepts],
            sum(not w.draining for w in self.supervisor.workers),
            bool(self.supervisor.info(time.monotonic())["crash_loop"])))

    def _handle_signals(self) -> None:
        for sig in self.signals.pop():
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("signal %s: stopping", signal.Signals(sig).name)
                self.running = False
            elif sig == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", self.path)
                self.reload_requested = True  # even if the bytes did not change
                self._schedule_reconcile(now=True)

    def _at(self, when: float, what: str) -> None:
        heapq.heappush(self.timers, (when, what))

    def _schedule_reconcile(self, now: bool = False) -> None:
        t = time.monotonic()
        if now:
            self.reconcile_due = (t, t)
            return
        first = self.reconcile_due[1] if self.reconcile_due else t
        self.reconcile_due = (min(t + DEBOUNCE, first + DEBOUNCE_MAX), first)

    # --- reconciling ---------------------------------------------------------------------------

    def _keep_for_workers(self, raw: bytes, config: Config) -> None:
        """Workers (re)start from these bytes (handed over in memory, see Supervisor)."""
        self.supervisor.keep_config(raw)
        with contextlib.suppress(FileNotFoundError):  # where earlier versions kept the copy
            os.unlink(os.path.join(config.daemon.state_dir, "running.toml"))

    def _reconcile(self, initial: bool = False) -> None:
        """Take the file if it settled on something new (keeping the last good config if it is
        bad), then converge to the config in force."""
        if not initial:
            self._take_file()
        self._converge()

    def _take_file(self) -> bool:
        """Look at the file once. True when a config was taken (the kernel may need to
        change); an unsettled file is looked at again later, an unreadable or bad one leaves
        the last good config in force."""
        outcome = self.file.check(time.monotonic())
        if isinstance(outcome, Unsettled):
            self.settle_at = outcome.check_again_at
            return False
        self.settle_at = None
        if isinstance(outcome, Unreadable):
            exc = outcome.error
            self.config_digest = ""  # whatever is read next is evaluated afresh
            self._refuse(ConfigError(self.path, [Problem(f"cannot read: {exc.strerror or exc}")]))
            self.reload_requested = False
            return False
        force, self.reload_requested = self.reload_requested, False
        if outcome.digest == self.config_digest and not force:
            return False
        self.config_digest = outcome.digest
        try:
            new = from_bytes(outcome.raw, self.path)
        except ConfigError as exc:
            self._refuse(exc)
            return False
        self.config_error = None
        changed = self._switch(new, outcome.raw, replace_workers=force)
        if self.config_error is None:  # not refused by _switch: new (or its equal) is in force
            self.config_loaded_at = time.time()
        return changed

    def _refuse(self, exc: ConfigError) -> None:
        if str(exc) == self.config_error:  # an unreadable file is looked at on every reconcile
            return
        self.config_error = str(exc)
        log.error("config not applied, the last good one stays in force:\n%s", exc)

    def _switch(self, new: Config, raw: bytes, replace_workers: bool = False) -> bool:
        """Put new in force. replace_workers: start new workers even if the relay's settings
        did not change (SIGHUP). True when anything changed."""
        old = self.config
        assert old is not None
        if new == old and not replace_workers:
            return False
        try:
            self._keep_for_workers(raw, new)
        except OSError as exc:
            self.config_error = f"cannot keep a copy for the workers: {exc}"
            log.error("config not applied: %s", self.config_error)
            return False
        self.notifier.send("RELOADING=1")
        if new != old:
            log.info("config changed: converging to the new one")
            if old.intercepts and not new.intercepts:
                log.warning("%s names no [[intercept]]: removing capture (%s in force until now)",
                            self.path, ", ".join(i.name for i in old.intercepts))
            self.file.settle = new.daemon.settle
            if owner_of(new) != owner_of(old):  # a new table, protocol or nft table: leave the old
                try:
                    (self.reconciler or Reconciler(old)).down(restore_sysctls=False)
                except KernelError as exc:
                    log.error("removing the old config's objects: %s", exc)
            if self.reconciler is not None:
                self.reconciler.close()
                self.reconciler = None
            self.config = new
            if new.metrics != old.metrics:
                self._close_metrics()
                self._open_metrics()
        if replace_workers or relay_view(new) != relay_view(old):
            log.info("reloading the relay workers")
            try:
                self.supervisor.reload(new)
            except OSError as exc:  # e.g. the new port is taken: the old workers keep serving
                log.error("relay reload failed, the running workers keep serving: %s", exc)
        self.notifier.send("READY=1")
        return True

    def _converge(self) -> None:
        assert self.config is not None
        self.reconciles += 1
        when, started = time.time(), time.monotonic()
        try:
            if self.reconciler is None:
                self.reconciler = Reconciler(self.config)
            result = self.reconciler.apply()
        except PreflightError as exc:
            self.counts.reconciled("error", time.monotonic() - started)
            self._failed(when, f"preflight: {exc}")
            return
        except Exception as exc:  # a kernel hiccup or our bug: retry, never die
            if not isinstance(exc, (KernelError, OSError)):
                log.exception("reconcile failed unexpectedly")
            self.counts.reconciled("error", time.monotonic() - started)
            self._failed(when, str(exc))
            if self.reconciler is not None:  # a fresh connection to the kernel next time
                with contextlib.suppress(Exception):
                    self.reconciler.close()
                self.reconciler = None
            return
        self.retry_delay = RETRY_FIRST
        # changes while the config in force was already converged to undo someone else's
        self.counts.reconciled("ok", time.monotonic() - started,
                               metrics.repairs(result.ops) if self.converged is self.config else {})
        self.converged = self.config
        changes = [str(op) for op in result.ops]
        for line in changes:
            log.info("%s", line)
        if changes:
            log.info("converged: %d changes, %d kernel writes", len(changes), result.writes)
        self.last = {"time": when, "result": "ok", "changes": changes, "writes": result.writes}

    def _failed(self, when: float, error: str) -> None:
        log.error("reconcile failed (retrying in %.1fs): %s", self.retry_delay, error)
        self.last = {"time": when, "result": "error", "error": error, "changes": []}
        t = time.monotonic()
        self.reconcile_due = (t + self.retry_delay, t)
        self.retry_delay = min(RETRY_MAX, self.retry_delay * 2)

    # --- metrics -------------------------------------------------------------------------------

    def _open_metrics(self) -> None:
        """Serve [metrics] listen, if set. A failure (the address is taken or not this host's)
        is logged and shown in status, and tried again at each resync: the gateway itself
        matters more than its metrics."""
        assert self.config is not None
        m = self.config.metrics
        if not m.enabled:
            self.metrics_error = None
            return
        server = MetricsServer(m.host, m.port, self.selector, time.monotonic, self._render,
                               refresh=lambda: self.stats.ask(self.supervisor.workers, again=True),
                               fresh=lambda: self.stats.idle)
        try:
            server.open()
        except OSError as exc:
            error = f"cannot listen on {m.listen}: {exc.strerror or exc}"
            if error != self.metrics_error:
                log.error("metrics: %s (trying again every resync_interval)", error)
            self.metrics_error = error
            return
        self.metrics_server, self.metrics_error = server, None
        log.info("metrics on http://%s/metrics", m.listen)

    def _close_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def metrics_snapshot(self) -> metrics.Snapshot:
        """What a scrape shows: built in the loop from what the daemon holds, no I/O."""
        assert self.config is not None
        counters = self.supervisor.counters()
        upstreams = tuple(u.name for u in self.config.upstreams)
        up, failures = metrics.upstream_series(
            counters, upstreams, sum(not w.draining for w in self.supervisor.workers))
        return metrics.Snapshot(
            counters=counters, daemon=self.counts, upstreams=upstreams,
            upstream_up=up, upstream_failures=failures,
            upstream_check_seconds=upstream_health.check_seconds(self.upstream_health()),
            config_valid=self.config_error is None, config_last_good=self.config_loaded_at,
            worker_restarts=sum(s.restarts for s in self.supervisor.slots))

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict:
        """What the daemon knows, without asking the kernel or waiting on a worker: the
        kernel's state as of the last reconcile (`tproxy status` reads the kernel itself),
        the workers and their last reported counters."""
        assert self.config is not None
        now = time.monotonic()
        return {"pid": os.getpid(), "config": self.path, "started": self.started,
                "config_error": self.config_error, "last_reconcile": self.last,
                "reconciles": self.reconciles, "in_sync": self.last.get("result") == "ok",
                "pending": self.reconcile_due is not None or self.settle_at is not None,
                **self.supervisor.info(now), "counters": self.supervisor.counters(),
                "upstreams": self.upstream_health(),
                "metrics": {"listen": self.config.metrics.listen if self.config.metrics.enabled
                            else None, "error": self.metrics_error}}


    def upstream_health(self) -> dict[str, dict]:
        """Each upstream's state, last check and its latency, merged over the serving workers'
        last reports (a draining worker's view is of a config on its way out)."""
        assert self.config is not None
        return upstream_health.merge(
            [u.name for u in self.config.upstreams],
            [(w.last, w.last_at) for w in self.supervisor.workers
             if not w.draining and w.last_at is not None], time.time(), time.monotonic())

    def _on_listing(self, w: Worker, report: dict, when: float) -> None:
        self.listings[w.proc.pid] = report

    def top(self) -> dict:
        """The open connections of every worker (each sends its TOP_ROWS busiest), busiest
        first, with totals over all of them."""
        pids = {w.proc.pid: w.slot for w in self.supervisor.workers}
        self.listings = {pid: doc for pid, doc in self.listings.items() if pid in pids}
        docs = list(self.listings.values())
        rows = [dict(row, worker=doc.get("pid")) for doc in docs
                for row in doc.get("connections", [])]
        rows.sort(key=lambda r: ((r["rate_up"] or 0) + (r["rate_down"] or 0),
                                 r["bytes_up"] + r["bytes_down"]), reverse=True)
        rates = [doc["rate"] for doc in docs if doc.get("rate") is not None]
        return {"time": time.time(), "workers": len(docs),
                "open": sum(doc.get("open", 0) for doc in docs),
                "udp_sessions": sum(doc.get("udp_sessions", 0) for doc in docs),
                "bytes_up": sum(doc.get("bytes_up", 0) for doc in docs),
                "bytes_down": sum(doc.get("bytes_down", 0) for doc in docs),
                "rate": sum(rates) if rates else None,
                "cost_ms": max((doc.get("cost_ms", 0) for doc in docs), default=0),
                "connections": rows[:TOP_ROWS]}


def relay_view(config: Config) -> tuple:
    """What the relay workers read from the config: a change here reloads them."""
    return (config.relay, config.marks.relay, listener_shape(config), config.daemon.state_dir,
            config.upstreams, config.routes)


def query(path: str, timeout: float = 5.0, kind: str = "status") -> dict:
    """The running daemon's status (or, kind "top", its open connections), from its socket."""
    return unixsock.ask(path, timeout, f"{kind}\n".encode())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tproxyd", description="tproxyd: converge, watch, relay")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tproxyd[%(process)d] %(levelname)s %(message)s")
    return Daemon(args.config).run()


if __name__ == "__main__":
    sys.exit(main())
