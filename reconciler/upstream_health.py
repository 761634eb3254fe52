"""Each upstream's health as the daemon shows it: the serving workers' views merged into one.

Every worker judges each upstream on its own (its connections, its own active checks) and
reports Health.status() in its stats under "health", with times as seconds before its report.
Here those become wall-clock times (the daemon knows when each report arrived) and one view per
upstream: down while any serving worker has it down (that worker fails its connections over),
since the earliest of them, for that worker's reason; the last check is the latest any worker
ran. Pure: the caller gives the reports and both clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tproxyd.state.health import DOWN, UP


def _at(wall_now: float, mono_now: float, reported_at: float, ago: float) -> float:
    """The wall-clock time of something `ago` seconds before a report received at reported_at
    (monotonic)."""
    return wall_now - (mono_now - reported_at) - ago


def merge(names: Sequence[str], reports: Iterable[tuple[dict, float]], wall_now: float,
          mono_now: float) -> dict[str, dict[str, Any]]:
    """names: the upstreams of the config in force; reports: (a serving worker's stats report,
    the monotonic time it arrived). Upstreams no worker reported yet are left out."""
    seen: dict[str, list[tuple[dict, float]]] = {name: [] for name in names}
    for report, at in reports:
        health = report.get("health")
        if not isinstance(health, dict):
            continue  # an older relay, or a worker that has not answered yet
        for name, h in health.items():
            if name in seen and isinstance(h, dict):
                seen[name].append((h, at))
    out: dict[str, dict[str, Any]] = {}
    for name, views in seen.items():
        if views:
            out[name] = _one(views, wall_now, mono_now)
    return out


def _one(views: list[tuple[dict, float]], wall_now: float, mono_now: float) -> dict[str, Any]:
    down = [(h, at) for h, at in views if h.get("state") == DOWN]
    if down:
        h, at = min(down, key=lambda v: _at(wall_now, mono_now, v[1], v[0].get("for", 0)))
        retry = [v.get("retry_in") for v, _ in down if v.get("retry_in") is not None]
        state: dict[str, Any] = {
            "state": DOWN, "since": _at(wall_now, mono_now, at, h.get("for", 0)),
            "reason": h.get("reason", ""), "retry_in": min(retry) if retry else None}
    else:
        state = {"state": UP, "since": max(_at(wall_now, mono_now, at, h.get("for", 0))
                                           for h, at in views),
                 "reason": "", "retry_in": None}
    state["workers"], state["down_in"] = len(views), len(down)
    checked = [(h, at) for h, at in views if h.get("last_check_ago") is not None]
    if checked:
        # The latest check across workers: each checks on its own every check_interval, so the
        # newest answer is the freshest measure of the same path (an older, slower one from
        # another worker says less about now; the largest would keep one slow check for good).
        h, at = max(checked, key=lambda v: _at(wall_now, mono_now, v[1], v[0]["last_check_ago"]))
        state.update(last_check=_at(wall_now, mono_now, at, h["last_check_ago"]),
                     last_check_ok=h.get("last_check_ok"),
                     last_check_seconds=h.get("last_check_latency"))
    else:
        state.update(last_check=None, last_check_ok=None, last_check_seconds=None)
    failures: dict[str, int] = {}
    for h, _ in views:
        for reason, n in (h.get("failures") or {}).items():
            failures[reason] = failures.get(reason, 0) + n
    state["failures"] = failures  # of the serving workers: per-life counts, not totals
    return state


def check_seconds(merged: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tproxyd_upstream_check_seconds: the latest check's duration, where it passed (a failed
    check has no duration worth a gauge; tproxyd_upstream_up and the check failures say it)."""
    return {name: v["last_check_seconds"] for name, v in merged.items()
            if v.get("last_check_ok") and v.get("last_check_seconds") is not None}
