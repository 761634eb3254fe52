"""Whether each upstream may be used now, and which one a route's connection tries next.

Pure and clocked from outside: every call takes `now` (time.monotonic() in the relay), so tests
drive time by hand. One Health per relay worker; nothing here does I/O.

The rules (issue 12):
- An attempt that FAILED (connect refused or timed out, handshake garbage, closed mid-way,
  authentication refused) marks the upstream down and the connection tries the next upstream
  of its route. Down, it is skipped until its backoff ends: 1 s after the first failure,
  doubling with each failure while down, at most 60 s.
- When the backoff ends, one connection at a time may try it (a trial; the others keep
  skipping it until the trial reports, or its connect_timeout passes). A trial that completes a
  handshake brings it up; one that fails doubles the backoff.
- Active checks (every check_interval; 0: none) run up or down. A failed check marks it down
  like a failed connection. Down, a passed check is not trusted until the next one passes too
  (CHECKS_TO_TRUST): no flapping back into use on one lucky answer.
- DECLINED: the upstream answered the handshake but refused this request (a SOCKS5 reply
  other than success, an HTTP status other than 2xx and 407). That is proof it works: it is not
  marked down (else one dead destination would take it down for everyone), and the connection
  tries the next upstream, which may reach what this one cannot.
- Failures of attempts that began before the upstream went down (stragglers of the same outage)
  are counted but do not lengthen the backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Iterable, List, Sequence

from .upstreams import DIRECT, REJECT, RouteRule, Upstream

UP, DOWN = "up", "down"
OK, DECLINED, FAILED = "ok", "declined", "failed"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
CHECKS_TO_TRUST = 2


def backoff(failures: int) -> float:
    """Seconds an upstream stays skipped after its n-th failure in a row (n >= 1)."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(failures - 1, 16))


@dataclass
class UpstreamHealth:
    """The state of one upstream in one worker. Mutable; changed only through its methods."""

    name: str
    check_interval: float = 0.0
    trial_timeout: float = 5.0  # the upstream's connect_timeout: a trial that never reports
    state: str = UP
    since: float = 0.0  # when state last changed
    reason: str = ""  # why it is down
    failures: int = 0  # failures in a row: the backoff's exponent
    retry_at: float = 0.0  # down: skipped until then
    trial_until: float | None = None  # down: a trial is in flight until then
    passes: int = 0  # down: checks passed in a row
    failure_counts: Dict[str, int] = field(default_factory=dict)  # by reason, ever
    last_check: float | None = None
    last_check_ok: bool | None = None
    last_check_latency: float | None = None  # seconds
    next_check_at: float = 0.0

    def usable(self, now: float) -> bool:
        """Whether a connection may try it now (up, or down with a trial allowed)."""
        if self.state == UP:
            return True
        return now >= self.retry_at and (self.trial_until is None or now >= self.trial_until)

    def begin(self, now: float) -> None:
        """A connection tries it: when down, that connection is the one trial."""
        if self.state == DOWN:
            self.trial_until = now + self.trial_timeout

    def failed(self, now: float, reason: str, started: float) -> None:
        """An attempt begun at `started` failed at `now` for `reason`."""
        self.failure_counts[reason] = self.failure_counts.get(reason, 0) + 1
        if self.state == UP:
            self._down(now, reason, failures=1)
        elif started >= self.since:  # a trial (or check) of the down upstream, not a straggler
            self._down(now, reason, failures=self.failures + 1)

    def succeeded(self, now: float) -> None:
        """A handshake completed (or was declined properly): it works."""
        if self.state == DOWN:
            self.state, self.since, self.reason = UP, now, ""
        self.failures, self.passes, self.trial_until = 0, 0, None

    def check_started(self, now: float) -> None:
        """An active check starts: the next is due one interval on (down: no later than the
        backoff's end, so a recovery is noticed as soon as it would be tried anyway)."""
        step = self.check_interval
        if self.state == DOWN:
            step = min(step, max(self.retry_at - now, BACKOFF_FIRST))
        self.next_check_at = now + step

    def check_passed(self, now: float, latency: float) -> None:
        self.last_check, self.last_check_ok, self.last_check_latency = now, True, latency
        if self.state == DOWN:
            self.passes += 1
            if self.passes >= CHECKS_TO_TRUST:
                self.succeeded(now)

    def check_failed(self, now: float, reason: str) -> None:
        self.last_check, self.last_check_ok, self.last_check_latency = now, False, None
        self.failed(now, f"check: {reason}", started=now)

    def check_due(self, now: float) -> bool:
        return self.check_interval > 0 and now >= self.next_check_at

    def _down(self, now: float, reason: str, failures: int) -> None:
        if self.state == UP:
            self.since = now
        self.state, self.reason, self.failures = DOWN, reason, failures
        self.retry_at = now + backoff(failures)
        self.trial_until, self.passes = None, 0

    def status(self, now: float) -> Dict[str, Any]:
        """For `tproxy status --json` (times as seconds ago, so no clock is shared)."""
        return {
            "state": self.state, "for": round(now - self.since, 3), "reason": self.reason,
            "retry_in": round(max(0.0, self.retry_at - now), 3) if self.state == DOWN else None,
            "failures": dict(self.failure_counts),
            "last_check_ago": None if self.last_check is None else round(now - self.last_check, 3),
            "last_check_ok": self.last_check_ok,
            "last_check_latency": self.last_check_latency,
        }


class Health:
    """Every upstream's state, and the failover choice for a route's connection."""

    def __init__(self, upstreams: Iterable[Upstream], now: float, previous: Health | None = None):
        """previous: the state before a reload; an upstream with the same name, type and
        address keeps it (a reload must not forget that an upstream is down)."""
        self.upstreams = {u.name: u for u in upstreams}
        self.state: Dict[str, UpstreamHealth] = {}
        for u in self.upstreams.values():
            old = previous.state.get(u.name) if previous is not None else None
            same = old is not None and previous is not None and _same(previous.upstreams[u.name], u)
            if same and old is not None:
                old.check_interval, old.trial_timeout = u.check_interval, u.connect_timeout
                self.state[u.name] = old
            else:  # first check right away: a fresh config learns the truth early
                self.state[u.name] = UpstreamHealth(u.name, u.check_interval, u.connect_timeout,
                                                    since=now, next_check_at=now)

    def pick(self, via: Sequence[str], now: float, tried: Collection[str] = ()) -> str | None:
        """The first upstream of via, in order, not yet tried by this connection and usable
        now; it is marked as tried by begin(). None: every upstream is down or was tried,
        and the client gets a reset."""
        for name in via:
            if name in tried:
                continue
            h = self.state.get(name)
            if h is not None and h.usable(now):
                h.begin(now)
                return name
        return None

    def report(self, name: str, now: float, outcome: str, reason: str = "",
               started: float | None = None) -> None:
        """The end of an attempt through `name` begun at `started`: OK, DECLINED or FAILED
        (reason: a short word such as "timeout", "refused", "auth_failed", "protocol")."""
        h = self.state[name]
        if outcome == FAILED:
            h.failed(now, reason or "failed", now if started is None else started)
        else:
            if outcome == DECLINED:
                h.failure_counts[f"declined: {reason}"] = h.failure_counts.get(f"declined: {reason}", 0) + 1
            h.succeeded(now)

    def due_checks(self, now: float) -> List[str]:
        """Upstreams whose active check should start now (the caller calls check_started)."""
        return [name for name, h in self.state.items() if h.check_due(now)]

    def next_check(self) -> float | None:
        """When the earliest active check is due (for the relay's timer), None if none are."""
        times = [h.next_check_at for h in self.state.values() if h.check_interval > 0]
        return min(times) if times else None

    def __getitem__(self, name: str) -> UpstreamHealth:
        return self.state[name]

    def status(self, now: float) -> Dict[str, Dict[str, Any]]:
        return {name: h.status(now) for name, h in self.state.items()}


UPSTREAM, NO_UPSTREAM = "upstream", "no_upstream"


@dataclass(frozen=True)
class Decision:
    """What a connection does next: DIRECT, REJECT, UPSTREAM (through `upstream`), or
    NO_UPSTREAM (every upstream of its route is down or was tried: reset the client)."""

    action: str
    route: RouteRule | None = None
    upstream: str | None = None

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else "direct"  # issue 14's `route`

    def __str__(self) -> str:
        if self.action == NO_UPSTREAM:
            assert self.route is not None
            return (f"route {self.route.name}: no upstream available "
                    f"({', '.join(self.route.via)} down or failed)")
        if self.action == UPSTREAM:
            return f"route {self.route_name} via {self.upstream}"
        return f"route {self.route_name}: {self.action}"


def decide(route: RouteRule | None, health: Health, now: float,
           tried: Collection[str] = ()) -> Decision:
    """At accept (tried empty) and after each failed upstream attempt of one connection (tried:
    the upstreams it has tried): where it goes next. route: RouteTable.match()'s answer."""
    if route is None or route.via[0] == DIRECT:
        return Decision(DIRECT, route)
    if route.via[0] == REJECT:
        return Decision(REJECT, route)
    name = health.pick(route.via, now, tried)
    return Decision(UPSTREAM, route, name) if name is not None else Decision(NO_UPSTREAM, route)


def _same(a: Upstream, b: Upstream) -> bool:
    return (a.type, a.host, a.port, a.username, a.password) == (b.type, b.host, b.port, b.username,
                                                                b.password)
