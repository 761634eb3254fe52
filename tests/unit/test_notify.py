"""What systemd is told: the STATUS= line, and only when it changes."""

from tproxyd.reconciler.notify import Notifier, status_text


def test_status_text_says_what_is_in_force_worst_news_first():
    ok = {"result": "ok"}
    assert status_text(None, ok, ["lan", "dmz"], 2, False) == \
        "converged: intercepting lan, dmz; 2 relay worker(s)"
    assert status_text(None, ok, [], 0, False) == "nothing to intercept"
    assert status_text(None, ok, ["lan"], 1, True).endswith("a worker is crash-looping")
    failed = {"result": "error", "error": "netlink:\n  EBUSY"}
    assert status_text(None, failed, ["lan"], 1, False) == "reconcile failed, retrying: netlink: EBUSY"
    error = "/etc/tproxyd/tproxy.toml: relay.port: 70000 is out of range\nsecond problem"
    assert status_text(error, failed, ["lan"], 1, False) == (
        "config error, the last good config stays in force: "
        "/etc/tproxyd/tproxy.toml: relay.port: 70000 is out of range")
    assert len(status_text("x" * 1000, ok, [], 0, False)) == 240


def test_status_is_sent_only_when_it_changes(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    sent = []
    n.send = sent.append  # type: ignore[method-assign]
    for text in ("converged", "converged", "config error", "converged"):
        n.status(text)
    assert sent == ["STATUS=converged", "STATUS=config error", "STATUS=converged"]
