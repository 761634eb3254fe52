"""`python -m tproxyd.relay --config F`: the relay alone, in the foreground, or as one of the
daemon's workers (--listen-fd: listening sockets it inherits). SIGTERM or SIGINT stops it
(connections closed); SIGUSR2 drains it (no new connections; it exits when the open ones end);
SIGUSR1 logs its counters."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from tproxyd.state.config import DEFAULT_CONFIG_PATH, TPROXY, Config
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import from_bytes, load

from . import native
from .loop import FDS_PER_CONNECTION, Relay, Settings, log
from .sockopts import raise_nofile


def settings_from(config: Config, stats_path: str | None) -> Settings:
    r = config.relay
    udp = config.relays_udp
    return Settings(port=r.port, mode=r.mode, spoof_source=r.spoof_source, mark=config.marks.relay,
                    max_connections=r.max_connections, connect_timeout=r.connect_timeout,
                    idle_timeout=r.idle_timeout, transparent=r.mode == TPROXY,
                    stats_path=stats_path, udp=udp, udp_idle_timeout=r.udp_idle_timeout,
                    max_udp_sessions=r.max_udp_sessions, max_pipe_memory=r.max_pipe_memory,
                    max_connections_per_client=r.max_connections_per_client,
                    max_udp_sessions_per_client=r.max_udp_sessions_per_client,
                    upstreams=tuple(config.upstreams), routes=tuple(config.routes),
                    access_log=config.log.access, sniff_timeout=r.sniff_timeout)


def die_with_parent() -> None:
    """A worker whose daemon died (even by SIGKILL) stops too, instead of serving on as an
    orphan with a config nobody converges any more."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def read_fd(fd: int) -> bytes:
    """All of an inherited file, from its start (pread: the offset is shared with the parent),
    and the descriptor closed."""
    try:
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def freeze_for_life() -> None:
    """The config, its compiled routes and the relay's own objects live as long as this worker
    (a new config is a new worker): moved out of the collector's sight, a full collection no
    longer walks them. 100,000 CIDRs in routes: a full collection pauses the loop, and every
    connection in it, 10.4 ms; frozen, 0.00 ms (python -m bench.routes)."""
    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tproxyd.relay",
                                description="tproxyd's TCP relay, in the foreground")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH)
    p.add_argument("--config-fd", type=int, metavar="FD",
                   help="read the config from this inherited descriptor (the daemon's last good "
                        "one); --config then only names it in messages")
    p.add_argument("--stats", help="Unix socket answering the counters as JSON "
                                   "(default: STATE_DIR/relay.sock)")
    p.add_argument("--listen-fd", type=int, action="append", default=[], metavar="FD",
                   help="an inherited listening socket (TCP or UDP) to serve; repeatable")
    p.add_argument("--report-fd", type=int, metavar="FD",
                   help="write the final counters (JSON) to this inherited pipe on exit")
    p.add_argument("--name", default="relay", help="the name in log lines (worker names)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection's end")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s {args.name}[%(process)d] %(levelname)s %(message)s")
    try:
        config = (from_bytes(read_fd(args.config_fd), args.config) if args.config_fd is not None
                  else load(args.config))
    except OSError as exc:
        print(f"cannot read the config from descriptor {args.config_fd}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    stats = args.stats or os.path.join(config.daemon.state_dir, "relay.sock")
    os.makedirs(os.path.dirname(stats), mode=0o700, exist_ok=True)
    settings = settings_from(config, stats)
    # a UDP session holds its outbound socket and, at worst, a reply socket of its own
    need = (settings.max_connections * FDS_PER_CONNECTION
            + (2 * settings.max_udp_sessions if settings.udp else 0) + 64)
    limit = raise_nofile(need)
    if limit < need:
        log.warning("open-file limit is %s, not the %s that max_connections = %s needs: past "
                    "about %s busy connections, accepts pause", limit, need,
                    settings.max_connections, (limit - 64) // FDS_PER_CONNECTION)
    if args.listen_fd:
        die_with_parent()
    relay = Relay(settings)

    # before the listeners open: a SIGTERM as soon as the port answers stops the relay cleanly
    def stop(signum: int, frame: object) -> None:
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR2, lambda *_: relay.request_drain())
    signal.signal(signal.SIGUSR1, lambda *_: log.info("counters %s",
                                                      json.dumps(relay.stats())))
    signal.set_wakeup_fd(relay.wakeup_fd(), warn_on_full_buffer=False)
    try:
        inherited = [socket.socket(fileno=fd) for fd in args.listen_fd] or None
        bound = relay.open(inherited)
    except OSError as exc:
        log.error("cannot listen on port %s: %s", settings.port, exc)
        return 1
    log.info("relaying TCP%s on %s (mode %s, spoof_source %s, max_connections %s, open files %s, "
             "%s); stats on %s", " and UDP" if settings.udp else "",
             ", ".join(f"{h} port {p}" for h, p in bound), settings.mode,
             settings.spoof_source, settings.max_connections, limit,
             "compiled" if native.compiled() else "pure Python", stats)
    stale = native.stale()
    if stale:
        log.warning("the compiled relay was built from other sources than these (%s), which do "
                    "not run: build it again (python3 setup.py build_ext --inplace)",
                    ", ".join(stale))
    freeze_for_life()
    relay.run()
    final = json.dumps(relay.stats())
    log.info("stopped: %s", final)
    if args.report_fd is not None:  # the daemon's totals: what we counted since it last asked
        with contextlib.suppress(OSError):
            os.write(args.report_fd, final.encode())  # far below a pipe's 64 KiB: one write
            os.close(args.report_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
