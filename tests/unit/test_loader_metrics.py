"""[metrics]: off unless listen is given; an IP address and port of this host, named by key path
when refused."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.state.config import Metrics
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import loads, parse_document


def test_metrics_are_off_unless_listen_is_given():
    assert not loads("[relay]\n").metrics.enabled
    assert loads("[metrics]\n").metrics == Metrics()


@pytest.mark.parametrize("listen, host, port, shown", [
    ("127.0.0.1:9641", "127.0.0.1", 9641, "127.0.0.1:9641"),
    ("0.0.0.0:9641", "0.0.0.0", 9641, "0.0.0.0:9641"),
    ("[::1]:9641", "::1", 9641, "[::1]:9641"),
    ("[2001:db8:0::7]:80", "2001:db8::7", 80, "[2001:db8::7]:80"),  # kept in canonical form
])
def test_listen_takes_ipv4_and_bracketed_ipv6(listen, host, port, shown):
    m = loads(f'[metrics]\nlisten = "{listen}"\n').metrics
    assert (m.enabled, m.host, m.port, m.listen) == (True, host, port, shown)


@pytest.mark.parametrize("body, words", [
    ('listen = "localhost:9641"', "not an IP address"),
    ('listen = "127.0.0.1"', "no port"),
    ('listen = "127.0.0.1:0"', "not a port"),
    ('listen = "127.0.0.1:65536"', "not a port"),
    ('listen = "::1:9641"', "in brackets"),
    ('listen = "[fe80::1%lo]:9641"', "not [IPv6 address]:port"),
    ('listen = "224.0.0.1:9641"', "multicast"),
    ('listen = "127.0.0.1:12345"', "relay's own port"),
    ('listen = 9641', "must be a string"),
    ('port = 9641', "unknown key"),
])
def test_refusals_name_the_key(body, words):
    with pytest.raises(ConfigError) as info:
        loads(f"[metrics]\n{body}\n", "t.toml")
    lines = str(info.value).splitlines()
    assert any(ln.startswith("t.toml: metrics.") and words in ln for ln in lines), lines


def test_a_relay_port_elsewhere_frees_the_default_port():
    m = loads('[relay]\nport = 9000\n[metrics]\nlisten = "127.0.0.1:12345"\n').metrics
    assert m.port == 12345


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.integers(), st.booleans(), st.lists(st.text(max_size=5)),
                 st.builds(lambda h, p: f"{h}:{p}", st.text(max_size=20), st.integers(-5, 70000))))
def test_arbitrary_listen_values_raise_only_config_error(value):
    with contextlib.suppress(ConfigError):
        m = parse_document({"metrics": {"listen": value}}).metrics
        assert m.enabled and 1 <= m.port <= 65535 and ipaddress.ip_address(m.host)
