"""`tproxy`: check, plan, apply, down and status for one tproxy.toml, in this network namespace.

Exit codes: 0 success (plan: nothing to change; status: all in sync), 1 error, 2 plan has
changes pending / status is not in sync (as `terraform plan -detailed-exitcode`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any, Dict, List, Sequence

from tproxyd.state import preflight
from tproxyd.state.config import DEFAULT_CONFIG_PATH, Config
from tproxyd.state.desired import render
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import load
from tproxyd.state.plan import op_to_json
from tproxyd.state.status import IN_SYNC, in_sync
from tproxyd.state.upstreams import summary as upstream_summary

from . import reload_cmd
from .desired_cache import load_rendered
from .errors import KernelError, PreflightError
from .statefiles import UntrustedError

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2
STALE = 3.0  # seconds: a worker's counters older than this say it is not answering


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


NOTHING_TO_INTERCEPT = ("nothing to intercept: no [[intercept]] in the config, so tproxyd adds "
                        "no rule, route, nft table or sysctl")


def _summary(config: Config) -> List[str]:
    desired = render(config)
    r, m, t = config.routing, config.marks, desired.nft
    if t is None:
        return [NOTHING_TO_INTERCEPT]
    lines = [
        f"relay port {config.relay.port}",
        f"marks: intercept {m.intercept:#x}, relay {m.relay:#x}",
        f"routing: fwmark {m.intercept:#x}/{m.intercept:#x} lookup {r.table} pref {r.priority} "
        f"proto {r.protocol} (ipv4, ipv6)",
        f"nft table inet {t.name}: {len(t.chains)} chains, {t.rule_count()} rules, {len(t.sets)} sets",
    ]
    for i in config.intercepts:
        ports = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in i.ports) or "all ports"
        lines.append(f"intercept {i.name}: {'/'.join(i.protocols)} entering "
                     f"{', '.join(i.interfaces)} to {len(i.destinations)} destinations, "
                     f"{len(i.exclude)} excluded, {ports}")
    if desired.sysctls:
        lines.append("sysctls: " + ", ".join(f"{k} = {v}" for k, v in desired.sysctls.items()))
    lines += upstream_summary(config.upstreams, config.routes)
    if config.routes:
        lines.append("traffic no route matches goes direct")
    return lines


def _reconciler(config: Config, args: argparse.Namespace | None = None):
    from .reconcile import (
        Reconciler,  # imports pyroute2 and nftables only when the kernel is needed
    )

    return Reconciler(config, getattr(args, "rendered", None))


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    findings: List[preflight.Finding] = []
    host_error: str | None = None
    if not args.config_only:
        try:
            rec = _reconciler(config, args)
            try:
                findings = rec.preflight()
            finally:
                rec.close()
        except (KernelError, OSError) as exc:
            host_error = str(exc)
    errors = preflight.errors(findings)
    if args.json:
        _print_json({"config": config.source, "valid": True, "summary": _summary(config),
                     "findings": [f.to_json() for f in findings], "host_error": host_error})
    else:
        print(f"{config.source}: valid")
        for line in _summary(config):
            print(f"  {line}")
        if host_error:
            print(f"host checks skipped: {host_error}")
        for f in findings:
            print(f)
        if not args.config_only and not findings and not host_error:
            print("host: no problems found")
    return EXIT_ERROR if errors or host_error else EXIT_OK


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    rec = _reconciler(config, args)
    try:
        ops = rec.plan()
    finally:
        rec.close()
    if args.json:
        _print_json({"config": config.source, "changes": [op_to_json(op) for op in ops]})
    elif ops:
        for op in ops:
            print(op)
        print(f"{len(ops)} changes pending")
    else:
        print("no changes: the host matches the config")
    return EXIT_PENDING if ops else EXIT_OK


def cmd_apply(config: Config, args: argparse.Namespace) -> int:
    rec = _reconciler(config, args)
    try:
        result = rec.apply(force=args.force)
    finally:
        rec.close()
    if args.json:
        _print_json({"config": config.source, "changes": [op_to_json(op) for op in result.ops],
                     "writes": result.writes, "findings": [f.to_json() for f in result.findings]})
        return EXIT_OK
    for f in result.findings:
        print(f, file=sys.stderr)
    for op in result.ops:
        print(op)
    if result.ops:
        print(f"applied {len(result.ops)} changes ({result.writes} kernel writes)")
    else:
        print("no changes: the host already matches the config")
    return EXIT_OK


def cmd_down(config: Config, args: argparse.Namespace) -> int:
    rec = _reconciler(config, args)
    try:
        result = rec.down()
    finally:
        rec.close()
    if args.json:
        _print_json({"config": config.source, "changes": [op_to_json(op) for op in result.ops],
                     "writes": result.writes})
        return EXIT_OK
    for op in result.ops:
        print(op)
    print(f"removed: {len(result.ops)} changes" if result.ops else "nothing to remove")
    return EXIT_OK


def _daemon_view(config: Config) -> dict | None:
    from .daemon import query

    try:
        return query(config.daemon.socket_path)
    except (OSError, ValueError):
        return None


def _clock(t: float, now: float) -> str:
    """Local time of day; with the date when that is not obvious."""
    return time.strftime("%H:%M:%S" if now - t < 12 * 3600 else "%Y-%m-%d %H:%M:%S",
                         time.localtime(t))


def _health_text(h: dict, now: float, checked: bool = True) -> str:
    """One upstream's state and last check, from the daemon's merged view (upstream_health.py):
    "up" or "DOWN since 15:02:07 (refused)", then "last check 3s ago ok (4.1 ms)". checked:
    whether it has active checks (check_interval > 0)."""
    if h.get("state") == "down":
        text = f"DOWN since {_clock(h['since'], now)} ({h.get('reason') or 'failed'})"
        if h.get("down_in", 0) < h.get("workers", 0):
            text += f" in {h['down_in']} of {h['workers']} workers"
        if h.get("retry_in") is not None:
            text += f", next try in {h['retry_in']:.0f}s"
    else:
        text = "up"
    if h.get("last_check") is None:
        return text + ("; not checked yet" if checked else "; no active checks")
    latency = h.get("last_check_seconds")
    result = ("ok" + (f" ({latency * 1000:.1f} ms)" if latency is not None else "")
              if h.get("last_check_ok") else "failed")
    return text + f"; last check {max(0.0, now - h['last_check']):.0f}s ago {result}"


def _upstream_lines(config: Config, view: dict, now: float | None = None) -> list[str]:
    """Each upstream's health and counts and each route's matches: health from the workers'
    views as the daemon merges them (view["upstreams"]), counts from the workers' counters as
    it sums them (an older daemon has only upstream_<name>_up: how many workers have it up)."""
    c, lines = view.get("counters") or {}, []
    health = view.get("upstreams") or {}
    now = time.time() if now is None else now
    workers = len(view.get("workers", []))
    for u in config.upstreams:
        k = f"upstream_{u.name}_"
        if u.name in health:
            state = _health_text(health[u.name], now, u.check_interval > 0)
        elif f"{k}up" in c:
            up = int(c[f"{k}up"])
            state = ("up" if up == workers else "DOWN" if up == 0
                     else f"up in {up} of {workers} workers")
        else:
            continue
        lines.append(f"upstream {u.name} ({u.type} {u.address}): {state}; "
                     f"{c.get(k + 'active', 0):.0f} active, {c.get(k + 'connections', 0):.0f} "
                     f"connections, {c.get(k + 'failures', 0):.0f} failures, "
                     f"{c.get(k + 'declined', 0):.0f} declined, {c.get(k + 'checks_failed', 0):.0f} "
                     f"of {c.get(k + 'checks', 0):.0f} checks failed")
    for r in config.routes:
        if f"route_{r.name}_connections" in c:
            lines.append(f"route {r.name}: {c[f'route_{r.name}_connections']:.0f} connections "
                         f"-> {', '.join(r.via)}")
    return lines


def _daemon_lines(path: str, view: dict | None) -> list[str]:
    if view is None:
        return [f"daemon: not running (nothing answers on {path})"]
    last = view.get("last_reconcile") or {}
    when = time.strftime("%H:%M:%S", time.localtime(last["time"])) if last.get("time") else "-"
    lines = [f"daemon: running, pid {view['pid']}, up {time.time() - view['started']:.0f}s, "
             f"{view['reconciles']} reconciles; last at {when}: {last.get('result', '-')}"
             + (f" ({len(last.get('changes', []))} changes)" if last.get("result") == "ok"
                else f": {last.get('error', '')}")]
    if view.get("config_error"):
        lines.append(f"config error (the last good config stays in force):\n  {view['config_error']}")
    for w in view.get("workers", []):
        age = w.get("counters_age")
        stale = f", not answering (counters from {age:.0f}s ago)" if age and age > STALE else ""
        lines.append(f"worker {w['slot']}: pid {w['pid']}, up {w['uptime']}s, {w['state']}, "
                     f"{w['restarts']} restarts{stale}")
    for slot in view.get("crash_loop", []):
        lines.append(f"worker {slot}: CRASH LOOP ({view['last_exits'].get(str(slot), '')})")
    m = view.get("metrics") or {}
    if m.get("error"):
        lines.append(f"metrics: NOT SERVED: {m['error']} (tried again every resync_interval)")
    elif m.get("listen"):
        lines.append(f"metrics: http://{m['listen']}/metrics")
    c = view.get("counters") or {}
    if c:
        lines.append(f"relay: {c.get('active', 0):.0f} active, {c.get('accepted', 0):.0f} accepted, "
                     f"{c.get('refused', 0):.0f} refused, {c.get('failed', 0):.0f} failed, "
                     f"{c.get('bytes_up', 0) / 1e6:.1f} MB up, {c.get('bytes_down', 0) / 1e6:.1f} MB "
                     f"down; udp {c.get('udp_sessions', 0):.0f} sessions, "
                     f"{c.get('udp_drops', 0) + c.get('udp_kernel_drops', 0):.0f} drops")
    return lines


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    view = _daemon_view(config)
    rec = _reconciler(config, args)
    try:
        statuses = rec.status()
        try:
            findings = rec.preflight()
        except KernelError as exc:
            findings = [preflight.Finding(preflight.WARNING, f"host checks failed: {exc}", "")]
    finally:
        rec.close()
    ok = in_sync(statuses) and not (view and view.get("config_error"))
    if args.json:
        _print_json({"config": config.source, "in_sync": in_sync(statuses),
                     "nothing_to_intercept": not config.intercepts,
                     "objects": [s.to_json() for s in statuses],
                     "findings": [f.to_json() for f in findings], "daemon": view})
    else:
        for line in _daemon_lines(config.daemon.socket_path, view):
            print(line)
        if not config.intercepts:
            print(NOTHING_TO_INTERCEPT)
        for line in _upstream_lines(config, view or {}):
            print(line)
        width = max((len(s.kind) for s in statuses), default=0)
        for s in statuses:
            detail = f"  ({s.detail})" if s.detail else ""
            print(f"{s.state.upper() if s.state != IN_SYNC else s.state:9} {s.kind:{width}}  "
                  f"{s.name}{detail}")
        for f in findings:
            print(f)
        print("in sync" if in_sync(statuses) else "not in sync: `tproxy apply` converges it")
    return EXIT_OK if ok else EXIT_PENDING


def _size(n: float | None, rate: bool = False) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            text = f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
            return text + ("/s" if rate else "")
        n /= 1000
    return "-"


def _top_lines(doc: dict, rows: int) -> list[str]:
    """The screen: totals, then the busiest connections and UDP sessions (the daemon sorted
    them by rate)."""
    head = (f"tproxyd top: {doc['open']} connections open ({doc['workers']} workers), "
            f"{doc['udp_sessions']} UDP sessions; {_size(doc['bytes_up'])} up, "
            f"{_size(doc['bytes_down'])} down; now {_size(doc['rate'], rate=True)}"
            f"   {time.strftime('%H:%M:%S', time.localtime(doc['time']))}")
    lines = [head, "", f"{'PROTO':5} {'CLIENT':24} {'DESTINATION':40} {'ROUTE':10} {'VIA':10} "
                       f"{'AGE':>7} {'UP':>8} {'DOWN':>8} {'RATE UP':>10} {'RATE DOWN':>10}"]
    for c in doc["connections"][:rows]:
        dst = c["dst"] + (f" ({c['domain']})" if c.get("domain") else "")
        lines.append(f"{c.get('proto', 'tcp'):5} {c['client']:24} {dst:40} {c['route']:10} "
                     f"{c['via']:10} {c['age']:6.0f}s "
                     f"{_size(c['bytes_up']):>8} {_size(c['bytes_down']):>8} "
                     f"{_size(c['rate_up'], True):>10} {_size(c['rate_down'], True):>10}")
    return lines


def cmd_top(config: Config, args: argparse.Namespace) -> int:
    """Live view of the open connections, from the daemon (which asks its workers)."""
    from .daemon import query

    path = config.daemon.socket_path
    while True:
        try:
            doc = query(path, kind="top")
        except (OSError, ValueError) as exc:
            print(f"tproxy top: no daemon answers on {path}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if "connections" not in doc:
            print("tproxy top: the running daemon does not list connections (an older tproxyd)",
                  file=sys.stderr)
            return EXIT_ERROR
        if args.json:
            _print_json(doc)
        else:
            rows = shutil.get_terminal_size().lines - 4
            text = "\n".join(_top_lines(doc, rows if not args.once else len(doc["connections"])))
            print(text if args.once else "\x1b[H\x1b[2J" + text, flush=True)
        if args.once:
            return EXIT_OK
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return EXIT_OK


COMMANDS = {
    "check": (cmd_check, "validate the config and inspect the host"),
    "plan": (cmd_plan, "print what apply would change (exit 2 when changes are pending)"),
    "apply": (cmd_apply, "converge the host to the config"),
    "down": (cmd_down, "remove everything tproxyd owns and restore the sysctls it changed"),
    "status": (cmd_status, "desired against live, per object"),
    "reload": (lambda config, args: reload_cmd.reload(config, timeout=args.timeout),
               "validate the file, then have the running daemon reload it and wait for the result"),
    "top": (cmd_top, "live view of the open connections, busiest first"),
}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH,
                        help=f"path of tproxy.toml (default {DEFAULT_CONFIG_PATH})")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = argparse.ArgumentParser(prog="tproxy", description="tproxyd's control-plane tool")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=text, description=text)
        if name == "check":
            sp.add_argument("--config-only", action="store_true",
                            help="validate the file only; do not inspect the host")
        if name == "apply":
            sp.add_argument("--force", action="store_true",
                            help="apply even when preflight reports errors")
        if name == "top":
            sp.add_argument("--once", action="store_true", help="print one view and exit")
            sp.add_argument("--interval", type=float, default=1.0,
                            help="seconds between refreshes (default 1)")
        if name == "reload":
            sp.add_argument("--timeout", type=float, default=60.0,
                            help="seconds to wait for the daemon's reconcile (default 60)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in ("check", "reload"):  # the validator always reads the file
            config = load(args.config)
        else:  # an unchanged file was validated and rendered before: desired_cache
            args.rendered = load_rendered(args.config)
            config = args.rendered.config
    except ConfigError as exc:
        if args.json:
            _print_json({"config": args.config, "valid": False, "errors": [
                _problem_json(p, exc.source) for p in exc.problems]})
        print(exc, file=sys.stderr)
        return EXIT_ERROR
    try:
        return COMMANDS[args.command][0](config, args)
    except PreflightError as exc:
        print(exc, file=sys.stderr)
        print("tproxy: apply stopped by preflight errors (nothing was changed); "
              "--force applies anyway", file=sys.stderr)
    except KernelError as exc:
        print(f"tproxy: {exc}", file=sys.stderr)
    except UntrustedError as exc:  # a PermissionError that root does not cure
        print(f"tproxy: {exc}", file=sys.stderr)
    except PermissionError as exc:
        print(f"tproxy: {exc}: run as root (CAP_NET_ADMIN)", file=sys.stderr)
    return EXIT_ERROR


def _problem_json(problem, source: str) -> Dict[str, Any]:
    return {"file": source, "path": problem.path, "line": problem.line,
            "column": problem.column, "message": problem.message}


if __name__ == "__main__":
    sys.exit(main())
