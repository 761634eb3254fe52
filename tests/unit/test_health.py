"""Upstream health: backoff 1 s doubling to 60 s, one trial at a time after it, two passed
checks before a down upstream is trusted, failover in `via` order. The clock is passed in."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.state.health import (
    BACKOFF_MAX,
    DECLINED,
    DIRECT,
    DOWN,
    FAILED,
    NO_UPSTREAM,
    OK,
    UP,
    UPSTREAM,
    Decision,
    Health,
    UpstreamHealth,
    backoff,
    decide,
)
from tproxyd.state.upstreams import RouteRule, Secret, Upstream


def up(name, **kw):
    return Upstream(name=name, type="socks5", host="198.51.100.7", port=1080, **kw)


A, B, C = up("a"), up("b", check_interval=0), up("c", connect_timeout=2)


def test_backoff_doubles_to_sixty():
    assert [backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff(10_000) == 60


def test_failover_in_via_order_and_down_upstreams_skipped():
    h = Health([A, B, C], now=0)
    assert h.pick(["a", "b", "c"], now=0) == "a"
    h.report("a", now=1, outcome=FAILED, reason="refused", started=0)
    assert h["a"].state == DOWN and h["a"].reason == "refused"
    assert h.pick(["a", "b", "c"], now=1, tried={"a"}) == "b"  # same connection, next upstream
    assert h.pick(["a", "b", "c"], now=1.5) == "b"  # a new connection skips the down one
    h.report("b", now=2, outcome=FAILED, reason="timeout", started=1.5)
    assert h.pick(["a", "b"], now=1.9, tried={"b"}) is None  # every upstream down: reset the client
    assert h.pick(["a", "b", "c"], now=1.9) == "c"


def test_one_trial_after_the_backoff_then_doubling():
    h = Health([C], now=0)
    h.report("c", now=10, outcome=FAILED, reason="refused", started=9)
    assert h.pick(["c"], now=10.99) is None
    assert h.pick(["c"], now=11) == "c"  # the trial
    assert h.pick(["c"], now=11.5) is None  # only one at a time
    h.report("c", now=11.6, outcome=FAILED, reason="refused", started=11)
    assert h["c"].retry_at == 11.6 + 2
    assert h.pick(["c"], now=13.6) == "c"
    assert h.pick(["c"], now=15.5) is None
    assert h.pick(["c"], now=15.6) == "c"  # a trial that never reported expires (connect_timeout 2)
    h.report("c", now=16, outcome=OK, started=15.6)
    assert h["c"].state == UP and h["c"].failures == 0
    h.report("c", now=17, outcome=FAILED, reason="timeout", started=16.5)
    assert h["c"].retry_at == 18  # the backoff starts over after a success


def test_stragglers_do_not_lengthen_the_backoff():
    h = Health([A], now=0)
    for started in (1, 2, 3, 4):  # four connections in flight when the upstream died
        h.report("a", now=10, outcome=FAILED, reason="timeout", started=started)
    assert h["a"].retry_at == 11 and h["a"].failure_counts == {"timeout": 4}


def test_backoff_is_capped():
    h = Health([B], now=0)
    now = 0.0
    for _ in range(12):
        h.report("b", now=now, outcome=FAILED, reason="refused", started=now)
        assert h["b"].retry_at - now <= BACKOFF_MAX
        now = h["b"].retry_at
    assert h["b"].retry_at - h["b"].since > 60


def test_a_down_upstream_needs_two_passed_checks():
    h = Health([A], now=0)
    assert h.due_checks(0) == ["a"]  # first check at once
    h["a"].check_started(0)
    assert h.due_checks(5) == [] and h.next_check() == 10
    h["a"].check_failed(1, "refused")
    assert h["a"].state == DOWN and h["a"].reason == "check: refused"
    h["a"].check_passed(20, latency=0.004)
    assert h["a"].state == DOWN
    h["a"].check_failed(30, "timeout")  # a failure in between starts the count over
    h["a"].check_passed(40, 0.004)
    assert h["a"].state == DOWN
    h["a"].check_passed(50, 0.003)
    assert h["a"].state == UP and h["a"].last_check_latency == 0.003


def test_checks_come_sooner_while_down():
    h = Health([A], now=0)
    h.report("a", now=100, outcome=FAILED, reason="refused", started=100)
    h["a"].check_started(100)
    assert h["a"].next_check_at == 101  # the backoff's end, not 10 s away
    h["a"].check_failed(101, "refused")
    h["a"].check_started(101)
    assert h["a"].next_check_at == 103
    assert Health([B], now=0).due_checks(0) == []  # check_interval 0: passive only


def test_declined_is_proof_of_life_and_counted():
    h = Health([A, B], now=0)
    h.report("a", now=1, outcome=FAILED, reason="refused", started=1)
    assert h.pick(["a", "b"], now=2) == "a"  # trial
    h.report("a", now=2.1, outcome=DECLINED, reason="host unreachable", started=2)
    assert h["a"].state == UP
    assert h["a"].failure_counts == {"refused": 1, "declined: host unreachable": 1}


def test_reload_keeps_the_state_of_unchanged_upstreams():
    h = Health([A, B], now=0)
    h.report("a", now=1, outcome=FAILED, reason="refused", started=1)
    h.report("b", now=1, outcome=FAILED, reason="refused", started=1)
    moved = Upstream(name="b", type="socks5", host="198.51.100.8", port=1080)
    again = Health([up("a", check_interval=30), moved], now=2, previous=h)
    assert again["a"].state == DOWN and again["a"].check_interval == 30
    assert again["b"].state == UP  # a new address is a new upstream
    secret = Upstream(name="a", type="socks5", host="198.51.100.7", port=1080, username="u",
                      password=Secret("x", "/p"))
    assert Health([secret], now=3, previous=h)["a"].state == UP


def test_status_is_json_ready():
    h = Health([A], now=0)
    h.report("a", now=5, outcome=FAILED, reason="timeout", started=4)
    status = h.status(now=5.5)["a"]
    assert status["state"] == "down" and status["reason"] == "timeout"
    assert status["retry_in"] == 0.5 and status["failures"] == {"timeout": 1}


EVENTS = st.lists(st.tuples(
    st.sampled_from(["pick", "ok", "declined", "failed", "straggler", "check_ok", "check_fail"]),
    st.sampled_from(["a", "b", "c"]),
    st.floats(0, 5)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(EVENTS, st.permutations(["a", "b", "c"]))
def test_invariants_under_any_sequence(events, via):
    """Whatever happens: a down upstream's backoff is one of 1, 2, 4 .. 60 s from the failure
    that set it; pick returns the first usable upstream in via order; a down upstream comes back
    only on a completed handshake or two checks passed in a row."""
    h = Health([A, B, C], now=0)
    now = 0.0
    passes = {n: 0 for n in "abc"}
    for kind, name, dt in events:
        now += dt
        u = h[name]
        was = u.state
        if kind == "pick":
            usable = [n for n in via if h[n].usable(now)]
            assert h.pick(via, now) == (usable[0] if usable else None)
            continue
        if kind == "ok":
            h.report(name, now, OK, started=now)
        elif kind == "declined":
            h.report(name, now, DECLINED, "refused", started=now)
        elif kind == "failed":
            h.report(name, now, FAILED, "timeout", started=now)
        elif kind == "straggler":
            h.report(name, now, FAILED, "timeout", started=-1)
        elif kind == "check_ok":
            u.check_passed(now, 0.001)
        else:
            u.check_failed(now, "refused")
        if kind == "check_ok" and was == DOWN:
            passes[name] += 1
        elif not (kind == "straggler" and was == DOWN):  # an old attempt says nothing of now
            passes[name] = 0
        if was == DOWN and u.state == UP:
            assert kind in ("ok", "declined") or passes[name] >= 2
        if u.state == DOWN:
            assert u.failures >= 1
            if kind in ("failed", "check_fail") or was == UP:
                assert math.isclose(u.retry_at - now, backoff(u.failures)) and backoff(u.failures) <= 60
            if now < u.retry_at:
                assert not u.usable(now)
        for other in h.state.values():
            assert isinstance(other, UpstreamHealth) and other.state in (UP, DOWN)


def test_decide_a_connections_path():
    direct = RouteRule(name="lan", via=("direct",))
    reject = RouteRule(name="ads", via=("reject",))
    corp = RouteRule(name="corp-nets", via=("a", "b"))
    h = Health([A, B], now=0)
    assert decide(None, h, 0) == Decision(DIRECT) and str(decide(None, h, 0)) == "route direct: direct"
    assert decide(direct, h, 0).action == DIRECT
    assert str(decide(reject, h, 0)) == "route ads: reject"
    first = decide(corp, h, 0)
    assert (first.action, first.upstream, str(first)) == (UPSTREAM, "a", "route corp-nets via a")
    h.report("a", 1, FAILED, "refused", started=0)
    assert decide(corp, h, 1, tried={"a"}).upstream == "b"
    h.report("b", 2, FAILED, "timeout", started=1)
    last = decide(corp, h, 2, tried={"a", "b"})
    assert last.action == NO_UPSTREAM
    assert str(last) == "route corp-nets: no upstream available (a, b down or failed)"
