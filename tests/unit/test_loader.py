"""The loader: defaults, every refusal with its key path, syntax positions, and that it raises
only ConfigError whatever it is fed."""

from __future__ import annotations

import contextlib
import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.strategies import net
from tproxyd.state.config import Cidr, Config
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import load, loads, parse_document

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINIMAL = '[[intercept]]\ninterfaces = ["lan0"]\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "t.toml")
    return str(info.value).splitlines()


@pytest.mark.parametrize("text", ["", " ", "\n\n", " \t\r\n  \n"])
def test_an_empty_file_is_an_error_not_intercept_nothing(text):
    """A file truncated by a save in progress must never read as "capture nothing"."""
    (line,) = problems(text)
    assert line.startswith("t.toml: ") and "empty" in line, line


def test_unread_empty_file_is_an_error_too(tmp_path):
    empty = tmp_path / "tproxy.toml"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load(str(empty))
    assert f"{empty}: " in str(info.value) and "empty" in str(info.value)


def test_a_file_without_intercepts_is_valid_and_captures_nothing():
    config = loads("[relay]\n")
    assert config.intercepts == ()
    assert config.relay.port == 12345
    assert (config.marks.intercept, config.marks.relay) == (1, 2)
    assert (config.routing.table, config.routing.priority) == (100, 10000)


def test_minimal_intercept_gets_defaults():
    (entry,) = loads(MINIMAL).intercepts
    assert entry.name == "intercept0"
    assert entry.interfaces == ("lan0",)
    assert entry.protocols == ("tcp", "udp")
    assert entry.destinations == (net("0.0.0.0/0"), net("::/0"))
    assert entry.ports == () and entry.exclude == ()


def test_example_file_is_valid():
    config = load(os.path.join(ROOT, "tproxy.toml.example"))
    assert isinstance(config, Config)
    assert [i.name for i in config.intercepts] == ["lan"]


def test_example_documents_every_key():
    """Every key the loader knows appears in the example, with a comment above it."""
    with open(os.path.join(ROOT, "tproxy.toml.example")) as f:
        lines = f.read().splitlines()
    from tproxyd.state import loader

    keys = {"port", "mode", "spoof_source", "max_connections", "connect_timeout", "idle_timeout",
            "udp_idle_timeout", "max_udp_sessions", "workers", "drain_timeout", "when_down",
            "socket", "resync_interval", "on_exit",
            "intercept", "relay", "table", "priority", "protocol", "forwarding",
            "state_dir", *loader.INTERCEPT_KEYS}
    for key in keys:
        index = next((i for i, ln in enumerate(lines) if ln.startswith(f"{key} =")), None)
        assert index is not None, f"{key} missing from the example"
        assert lines[index - 1].startswith("#"), f"{key} has no comment"


def test_workers_auto_is_left_to_the_supervisor():
    assert loads('[relay]\nworkers = "auto"\n').relay.workers == 0
    assert loads("[daemon]\n").daemon.socket_path == "/run/tproxyd/tproxyd.sock"


def test_ports_and_ranges():
    (entry,) = loads(MINIMAL + 'ports = [443, "8000-8999", "22"]\n').intercepts
    assert entry.ports == ((443, 443), (8000, 8999), (22, 22))


def test_a_port_in_non_ascii_digits_is_a_config_error_naming_it():
    """"²" passes str.isdigit() but not int(): found by hypothesis in the package build."""
    with pytest.raises(ConfigError) as err:
        loads(MINIMAL + 'ports = ["443", "8000-\u00b2"]\n')
    assert "intercept[0].ports[1]" in str(err.value) and "not a port number" in str(err.value)


@pytest.mark.parametrize("snippet, where, words", [
    ('[relay]\nport = 0\n', "relay.port", "out of range"),
    ('[relay]\nport = "x"\n', "relay.port", "must be an integer"),
    ('[relay]\nprot = 1\n', "relay.prot", "did you mean 'port'"),
    ('[marks]\nintercept = 0\n', "marks.intercept", "out of range"),
    ('[marks]\nintercept = 3\nrelay = 2\n', "marks", "share bits 0x2"),
    ('[routing]\ntable = 254\n', "routing.table", "'main' table"),
    ('[routing]\ntable = 0\n', "routing.table", "out of range"),
    ('[routing]\ntable = 255\n', "routing.table", "'local' table"),
    ('[routing]\npriority = 32766\n', "routing.priority", "out of range"),
    ('[routing]\nprotocol = 4\n', "routing.protocol", "reserved"),
    ('[routing]\nforwarding = 1\n', "routing.forwarding", "true or false"),
    ('[nftables]\ntable = "tproxy"\n', "nftables.table", "keyword"),
    ('[nftables]\ntable = "a b"\n', "nftables.table", "must be a letter"),
    ('[daemon]\nstate_dir = "run"\n', "daemon.state_dir", "absolute"),
    ('[bogus]\n', "bogus", "unknown key"),
    ('[relay]\nmode = "nat"\n', "relay.mode", "not one of 'tproxy', 'redirect'"),
    ('[relay]\nspoof_source = "yes"\n', "relay.spoof_source", "true or false"),
    ('[relay]\nmax_connections = 0\n', "relay.max_connections", "out of range"),
    ('[relay]\nconnect_timeout = 0\n', "relay.connect_timeout", "out of range"),
    ('[relay]\nidle_timeout = "1h"\n', "relay.idle_timeout", "number of seconds"),
    ('[relay]\nworkers = "many"\n', "relay.workers", "neither a number"),
    ('[relay]\nworkers = 0\n', "relay.workers", "out of range"),
    ('[relay]\nwhen_down = "drop"\n', "relay.when_down", "not one of"),
    ('[daemon]\non_exit = "stay"\n', "daemon.on_exit", "not one of"),
    ('[daemon]\nsocket = "x.sock"\n', "daemon.socket", "absolute"),
    ('[daemon]\nresync_interval = 0\n', "daemon.resync_interval", "out of range"),
    ('[daemon]\nsettle = 0\n', "daemon.settle", "out of range"),
    ('[daemon]\nsettle = 61\n', "daemon.settle", "out of range"),
    ('[daemon]\nsettle = "1s"\n', "daemon.settle", "number of seconds"),
    ('[relay]\nmode = "redirect"\n[[intercept]]\ninterfaces = ["a"]\nprotocols = ["udp"]\n',
     "intercept[0].protocols", "TCP only"),
    ('relay = 1\n', "relay", "must be a table"),
    ('[[intercept]]\ninterfaces = ["a"]\ndestinations = ["\\u0000"]\n',
     "intercept[0].destinations[0]", "not an IPv4 or IPv6"),
])
def test_refusals_name_the_key(snippet, where, words):
    lines = problems(snippet)
    assert any(ln.startswith(f"t.toml: {where}:") and words in ln for ln in lines), lines


@pytest.mark.parametrize("body, where, words", [
    ('ports = [1, 2, 70000]', "intercept[0].ports[2]", "out of range"),
    ('ports = ["9-3"]', "intercept[0].ports[0]", "backwards"),
    ('ports = ["http"]', "intercept[0].ports[0]", "not a port"),
    ('ports = [true]', "intercept[0].ports[0]", "must be a port"),
    ('destinations = ["10.0.0.0/33"]', "intercept[0].destinations[0]", "not an IPv4 or IPv6"),
    ('destinations = ["10.0.0.1/8"]', "intercept[0].destinations[0]", "did you mean '10.0.0.0/8'"),
    ('destinations = []', "intercept[0].destinations", "at least one"),
    ('exclude = ["fe80::1%eth0"]', "intercept[0].exclude[0]", "not an IPv4 or IPv6"),
    ('protocols = ["icmp"]', "intercept[0].protocols[0]", "not a protocol"),
    ('protocols = []', "intercept[0].protocols", "at least one"),
    ('name = "Bad-Name"', "intercept[0].name", "lowercase"),
    ('colour = "red"', "intercept[0].colour", "unknown key"),
])
def test_intercept_refusals_name_the_key(body, where, words):
    lines = problems(f'[[intercept]]\ninterfaces = ["lan0"]\n{body}\n')
    assert any(ln.startswith(f"t.toml: {where}:") and words in ln for ln in lines), lines


def test_interfaces_required_and_checked():
    assert any("intercept[0].interfaces: is required" in ln for ln in problems("[[intercept]]\n"))
    lines = problems('[[intercept]]\ninterfaces = ["lan0", "lan0", "way-too-long-name0"]\n')
    assert any("intercept[0].interfaces[1]" in ln and "twice" in ln for ln in lines)
    assert any("intercept[0].interfaces[2]" in ln and "not a valid" in ln for ln in lines)


def test_duplicate_names():
    text = '[[intercept]]\nname = "a"\ninterfaces = ["x"]\n[[intercept]]\nname = "a"\ninterfaces = ["y"]\n'
    assert any("intercept[1].name" in ln and "already the name of intercept[0]" in ln
               for ln in problems(text))


def test_all_problems_reported_at_once():
    lines = problems('[relay]\nport = 0\n[routing]\ntable = 254\n')
    assert len(lines) == 2


def test_syntax_error_has_line_and_column():
    (line,) = problems('[relay]\nport = 1\nmarks = [1,\n  ]]\n')
    assert line.startswith("t.toml:4:"), line
    assert "TOML syntax" in line


def test_syntax_error_at_end_of_file():
    (line,) = problems('a = 1\nb =')
    assert line.startswith("t.toml:2:"), line


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "absent.toml"))
    assert "absent.toml: cannot read" in str(info.value)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"a = 1\n\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load(str(bad))
    assert "bin.toml:2:" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_raises_only_config_error(text):
    with contextlib.suppress(ConfigError):
        loads(text)


TOML_SCALARS = st.one_of(st.integers(min_value=-(2**64), max_value=2**64), st.text(max_size=20),
                         st.booleans(), st.floats(allow_nan=False))
TOML_VALUES = st.recursive(TOML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)
KEYS = st.sampled_from(["relay", "marks", "routing", "nftables", "daemon", "intercept", "port",
                        "table", "interfaces", "ports", "destinations", "name", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, st.one_of(TOML_VALUES, st.lists(
    st.dictionaries(KEYS, TOML_VALUES, max_size=5), max_size=3)), max_size=6))
def test_arbitrary_documents_raise_only_config_error(doc):
    with contextlib.suppress(ConfigError):
        parse_document(doc)


cidr_texts = st.one_of(
    st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1),
              st.integers(0, 40)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1),
              st.integers(0, 130)),
    st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(0, 2**32 - 1)),
    st.text(alphabet="0123456789abcdef.:/% ", max_size=24),
    st.sampled_from(["01.2.3.0/24", "1.2.3.0/024", "2001:DB8::/32", "2001:db8:0::/48", " 1.2.3.0/24",
                     "1.2.3.4/32", "::/0", "0.0.0.0/0", "1.2.3.0/²", "fe80::1%eth0"]),
)


@settings(max_examples=500)
@given(cidr_texts)
def test_fast_cidr_reading_agrees_with_ipaddress(text):
    """The inet_pton fast path accepts exactly what ipaddress accepts, with the same value."""
    doc = f'[[intercept]]\ninterfaces = ["lan0"]\ndestinations = ["{text}"]\n'
    try:
        expected = Cidr.of(ipaddress.ip_network(text.strip(), strict=True)) if "%" not in text else None
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ConfigError):
            loads(doc)
    else:
        assert loads(doc).intercepts[0].destinations == (expected,)
