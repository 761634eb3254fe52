"""[[upstream]] and [[route]]: defaults, every refusal with its key path, the secret kept out of
reprs and pickles, and the loop guard's pure check."""

from __future__ import annotations

import contextlib
import os
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.strategies import net
from tproxyd.state import loader
from tproxyd.state.config import Intercept
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import loads, parse_document
from tproxyd.state.upstreams import (
    RouteRule,
    Secret,
    Upstream,
    UpstreamPath,
    captured_paths,
    summary,
)


@pytest.fixture
def pw(tmp_path):
    """A password file (mode 600) holding 's3cret' and a second line that is ignored."""
    path = tmp_path / "corp.password"
    path.write_bytes(b"s3cret\r\nnot this line\n")
    os.chmod(path, 0o600)
    return str(path)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "t.toml")
    return str(info.value).splitlines()


def assert_refused(text: str, where: str, words: str) -> None:
    lines = problems(text)
    assert any(ln.startswith(f"t.toml: {where}:") and words in ln for ln in lines), lines


SOCKS = '[[upstream]]\nname = "corp"\ntype = "socks5"\naddress = "198.51.100.7:1080"\n'
HTTPUP = '[[upstream]]\nname = "web"\ntype = "http"\naddress = "proxy.example.net:3128"\n'


def test_upstream_defaults_and_route_defaults():
    config = loads(SOCKS + '[[route]]\nvia = "corp"\n[[route]]\nname = "rest"\nvia = "direct"\n')
    (up,) = config.upstreams
    assert up == Upstream(name="corp", type="socks5", host="198.51.100.7", port=1080)
    assert (up.connect_timeout, up.check_interval, up.udp, up.username, up.password) == \
        (5.0, 10.0, False, "", None)
    first, second = config.routes
    assert first == RouteRule(name="route0", via=("corp",), protocols=("tcp",))  # corp has no udp
    assert (first.destinations, first.ports, first.sources) == (None, None, None)
    assert second.name == "rest" and second.action == "direct" and second.protocols == ("tcp", "udp")
    assert first.action == "upstream"
    assert config.upstream("corp") is up


def test_full_upstream_and_route(pw):
    text = (SOCKS + f'username = "alice"\npassword_file = "{pw}"\nudp = true\nconnect_timeout = 3\n'
            'check_interval = 0\n' + HTTPUP + 'check_target = "[2001:db8::5]:443"\n'
            '[[route]]\nname = "corp-nets"\ndestinations = ["10.0.0.0/8", "2001:db8:100::/48"]\n'
            'ports = [443, "8000-8999"]\nsources = ["192.168.10.0/24"]\nprotocols = ["tcp", "udp"]\n'
            'via = ["corp"]\n[[route]]\nvia = ["web", "corp"]\nports = [80]\n')
    config = loads(text)
    corp, web = config.upstreams
    assert corp.password is not None and corp.password.reveal() == "s3cret"
    assert (corp.udp, corp.connect_timeout, corp.check_interval) == (True, 3.0, 0.0)
    assert (web.host, web.port, web.check_target, web.address) == \
        ("proxy.example.net", 3128, "[2001:db8::5]:443", "proxy.example.net:3128")
    route, second = config.routes
    assert route.destinations == (net("10.0.0.0/8"), net("2001:db8:100::/48"))
    assert route.ports == ((443, 443), (8000, 8999))
    assert route.sources == (net("192.168.10.0/24"),)
    assert route.protocols == ("tcp", "udp")
    assert second.via == ("web", "corp") and second.protocols == ("tcp",)


def test_ipv6_and_name_addresses():
    text = ('[[upstream]]\nname = "a"\ntype = "socks5"\naddress = "[2001:db8::7]:1080"\n'
            '[[upstream]]\nname = "b"\ntype = "http"\naddress = "Proxy-1.example.:8080"\n')
    a, b = loads(text).upstreams
    assert (a.host, a.port, a.address, a.ip()) == ("2001:db8::7", 1080, "[2001:db8::7]:1080",
                                                   (6, 0x20010DB8000000000000000000000007))
    assert (b.host, b.ip()) == ("Proxy-1.example.", None)


def test_secret_never_in_repr_str_or_pickle(pw):
    config = loads(SOCKS + f'username = "alice"\npassword_file = "{pw}"\n')
    for text in (repr(config), str(config), repr(config.upstreams[0]), str(config.upstreams[0].password)):
        assert "s3cret" not in text
    assert pw in repr(config.upstreams[0].password)
    dumped = pickle.dumps(config)
    assert b"s3cret" not in dumped
    back = pickle.loads(dumped)
    assert back.upstreams[0].password is not None and not back.upstreams[0].password.loaded
    with pytest.raises(LookupError):
        back.upstreams[0].password.reveal()


def test_secret_equality_follows_the_value():
    assert Secret("a", "/f") == Secret("a", "/f")
    assert Secret("a", "/f") != Secret("b", "/f")
    assert Secret(None, "/f") != Secret("a", "/f")
    assert hash(Secret("a", "/f")) == hash(Secret("b", "/f"))


def test_route_pickles_round_trip():
    config = loads(SOCKS + '[[route]]\ndestinations = ["198.18.0.0/15", "2001:db8::/32"]\n'
                           'sources = ["198.18.1.0/24"]\nvia = "corp"\n[[route]]\nvia = "reject"\n')
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize("body, where, words", [
    ('name = "Corp"\ntype = "socks5"\naddress = "1.2.3.4:1"', "upstream[0].name", "lowercase"),
    ('name = "direct"\ntype = "socks5"\naddress = "1.2.3.4:1"', "upstream[0].name", "reserved"),
    ('type = "socks5"\naddress = "1.2.3.4:1"', "upstream[0].name", "is required"),
    ('name = "a"\naddress = "1.2.3.4:1"', "upstream[0].type", "is required"),
    ('name = "a"\ntype = "socks4"\naddress = "1.2.3.4:1"', "upstream[0].type", "not one of"),
    ('name = "a"\ntype = "socks5"', "upstream[0].address", "is required"),
    ('name = "a"\ntype = "socks5"\naddress = "198.51.100.7"', "upstream[0].address", "has no port"),
    ('name = "a"\ntype = "socks5"\naddress = "2001:db8::7:1080"', "upstream[0].address", "in brackets"),
    ('name = "a"\ntype = "socks5"\naddress = "[198.51.100.7]:1080"', "upstream[0].address",
     "not [IPv6 address]:port"),
    ('name = "a"\ntype = "socks5"\naddress = "[2001:db8::7]1080"', "upstream[0].address",
     "not [IPv6 address]:port"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:0"', "upstream[0].address", "not a port"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:http"', "upstream[0].address", "not a port"),
    ('name = "a"\ntype = "socks5"\naddress = "300.1.2.3:1080"', "upstream[0].address",
     "neither an IP address nor a DNS name"),
    ('name = "a"\ntype = "socks5"\naddress = "bad_name.example:1080"', "upstream[0].address",
     "neither an IP address nor a DNS name"),
    ('name = "a"\ntype = "socks5"\naddress = "-x.example:1080"', "upstream[0].address", "neither"),
    ('name = "a"\ntype = "socks5"\naddress = "0.0.0.0:1080"', "upstream[0].address", "can listen on"),
    ('name = "a"\ntype = "socks5"\naddress = "127.0.0.1:12345"', "upstream[0].address",
     "relay's own port"),
    ('name = "a"\ntype = "socks5"\naddress = "[::1]:12345"', "upstream[0].address", "relay's own port"),
    ('name = "a"\ntype = "socks5"\naddress = 1080', "upstream[0].address", "must be a string"),
    ('name = "a"\ntype = "http"\naddress = "1.2.3.4:1"\nudp = true', "upstream[0].udp", "TCP only"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nudp = "yes"', "upstream[0].udp", "true or false"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nusername = "u"', "upstream[0].password_file",
     "is required with a username"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nusername = ""', "upstream[0].username", "empty"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nusername = "u"\npassword_file = "/nonexistent/pw"',
     "upstream[0].password_file", "cannot read"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nusername = "u"\npassword_file = "pw"',
     "upstream[0].password_file", "absolute"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\npassword = "x"', "upstream[0].password",
     "unknown key"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nconnect_timeout = 0', "upstream[0].connect_timeout",
     "out of range"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\ncheck_interval = -1', "upstream[0].check_interval",
     "out of range"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\ncheck_target = "1.2.3.4:443"',
     "upstream[0].check_target", "for http upstreams"),
    ('name = "a"\ntype = "http"\naddress = "1.2.3.4:1"\ncheck_target = "example.net"',
     "upstream[0].check_target", "has no port"),
    ('name = "a"\ntype = "http"\naddress = "1.2.3.4:1"\nusername = "u:v"', "upstream[0].username",
     "contains ':'"),
    ('name = "a"\ntype = "socks5"\naddress = "1.2.3.4:1"\nusername = "' + "u" * 256 + '"',
     "upstream[0].username", "255 bytes"),
])
def test_upstream_refusals(body, where, words):
    assert_refused(f"[[upstream]]\n{body}\n", where, words)


def test_upstream_must_be_tables():
    assert_refused("upstream = 1\n", "upstream", "array of tables")
    assert_refused("upstream = [1]\n", "upstream[0]", "must be a table")


def test_password_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    for mode in (0o640, 0o604, 0o644):
        os.chmod(path, mode)
        text = SOCKS + f'username = "u"\npassword_file = "{path}"\n'
        lines = problems(text)
        assert any("upstream[0].password_file" in ln and "readable by group or others" in ln
                   and f"chmod 600 {path}" in ln for ln in lines), lines
        assert not any("s3cret" in ln for ln in lines)
    os.chmod(path, 0o400)
    assert loads(SOCKS + f'username = "u"\npassword_file = "{path}"\n').upstreams[0].password.reveal() \
        == "s3cret"


def test_password_file_contents_refused(tmp_path):
    cases = {"empty": (b"\nsecond\n", "is empty"), "long": (b"x" * 300, "255 bytes"),
             "utf8": (b"\xff\xfe\n", "not valid UTF-8"), "huge": (b"y" * 5000, "longer than 4096")}
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        assert_refused(SOCKS + f'username = "u"\npassword_file = "{path}"\n',
                       "upstream[0].password_file", words)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for special in (tmp_path, fifo):  # a FIFO must not hang the loader
        assert_refused(SOCKS + f'username = "u"\npassword_file = "{special}"\n',
                       "upstream[0].password_file", "not a regular file")


def test_http_password_may_be_long(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"z" * 300 + b"\n")
    os.chmod(path, 0o600)
    (up,) = loads(HTTPUP + f'username = "u"\npassword_file = "{path}"\n').upstreams
    assert up.password.reveal() == "z" * 300


def test_password_file_without_username(pw):
    assert_refused(SOCKS + f'password_file = "{pw}"\n', "upstream[0].password_file",
                   "without a username")


def test_duplicate_upstream_names():
    assert_refused(SOCKS + SOCKS, "upstream[1].name", "already the name of upstream[0]")


@pytest.mark.parametrize("body, where, words", [
    ('via = "nowhere"', "route[0].via", "'nowhere' is not an upstream"),
    ('via = "crop"', "route[0].via", "did you mean 'corp'"),
    ('via = ["corp", "direct"]', "route[0].via[1]", "stands alone"),
    ('via = ["reject"]\nports = [1]\nname = "x"\n[[route]]\nvia = ["corp", "corp"]', "route[1].via[1]",
     "listed twice"),
    ('via = []', "route[0].via", "at least one"),
    ('via = 1', "route[0].via", "must be an array"),
    ('via = [1]', "route[0].via[0]", "must be a string"),
    ('ports = [443]', "route[0].via", "is required"),
    ('via = "direct"\nname = "Bad Name"', "route[0].name", "lowercase"),
    ('via = "direct"\ndestinations = ["10.0.0.1/8"]', "route[0].destinations[0]",
     "did you mean '10.0.0.0/8'"),
    ('via = "direct"\ndestinations = ["nope"]', "route[0].destinations[0]", "not an IPv4 or IPv6"),
    ('via = "direct"\ndestinations = []', "route[0].destinations", "match nothing"),
    ('via = "direct"\nsources = ["198.18.0.0/33"]', "route[0].sources[0]", "not an IPv4 or IPv6"),
    ('via = "direct"\nsources = []', "route[0].sources", "match nothing"),
    ('via = "direct"\nports = ["9-3"]', "route[0].ports[0]", "backwards"),
    ('via = "direct"\nports = [0]', "route[0].ports[0]", "out of range"),
    ('via = "direct"\nports = ["1-70000"]', "route[0].ports[0]", "out of range"),
    ('via = "direct"\nports = []', "route[0].ports", "match nothing"),
    ('via = "direct"\nprotocols = ["icmp"]', "route[0].protocols[0]", "not a protocol"),
    ('via = "direct"\nprotocols = []', "route[0].protocols", "at least one"),
    ('via = "corp"\nprotocols = ["udp"]', "route[0].protocols", "UDP cannot go through upstream 'corp'"),
    ('via = "direct"\ndomain = "x"', "route[0].domain", "unknown key"),
])
def test_route_refusals(body, where, words):
    assert_refused(SOCKS + f"[[route]]\n{body}\n", where, words)


def test_route_must_be_tables_and_names_unique():
    assert_refused("route = {}\n", "route", "array of tables")
    assert_refused('[[route]]\nname = "a"\nvia = "direct"\n[[route]]\nname = "a"\nvia = "reject"\n',
                   "route[1].name", "already the name of route[0]")
    # a default name taken by hand is a duplicate too
    assert_refused('[[route]]\nname = "route1"\nvia = "direct"\n[[route]]\nvia = "reject"\n',
                   "route[1].name", "already the name")


def test_udp_route_through_udp_upstream():
    config = loads(SOCKS + 'udp = true\n[[route]]\nvia = "corp"\nprotocols = ["udp"]\n')
    assert config.routes[0].protocols == ("udp",)
    assert loads(SOCKS + 'udp = true\n[[route]]\nvia = "corp"\n').routes[0].protocols == ("tcp", "udp")


def test_route_naming_a_broken_upstream_gets_no_second_error():
    lines = problems('[[upstream]]\nname = "corp"\ntype = "socks4"\naddress = "1.2.3.4:1"\n'
                     '[[route]]\nvia = "corp"\n')
    assert len(lines) == 1 and "upstream[0].type" in lines[0], lines


def test_every_problem_at_once():
    lines = problems(SOCKS + 'udp = 3\n[[route]]\nvia = "x"\nports = [0]\n')
    assert len(lines) == 3, lines


LAN = Intercept(name="lan", interfaces=("lan0",), destinations=(net("0.0.0.0/0"), net("::/0")),
                exclude=(net("10.0.0.0/8"),), ports=())
CORP = Upstream(name="corp", type="socks5", host="198.51.100.7", port=1080)


def test_loop_guard_flags_an_upstream_captured_where_it_is_reached():
    paths = [UpstreamPath("corp", "198.51.100.7", "lan0")]
    assert captured_paths([LAN], [CORP], paths) == [(paths[0], LAN)]


@pytest.mark.parametrize("path, intercept", [
    (UpstreamPath("corp", "198.51.100.7", "wan0"), LAN),  # reached through another interface
    (UpstreamPath("corp", "10.1.2.3", "lan0"), LAN),  # excluded from capture
    (UpstreamPath("corp", "198.51.100.7", "lan0"), Intercept(name="lan", interfaces=("lan0",),
                                                             ports=((443, 443),))),  # other port
    (UpstreamPath("corp", "198.51.100.7", "lan0"), Intercept(name="lan", interfaces=("lan0",),
                                                             protocols=("udp",))),
    (UpstreamPath("corp", "198.51.100.7", "lan0"), Intercept(name="lan", interfaces=("lan0",),
                                                             destinations=(net("::/0"),))),
    (UpstreamPath("other", "198.51.100.7", "lan0"), LAN),  # not one of ours
    (UpstreamPath("corp", "proxy.example", "lan0"), LAN),  # not resolved
])
def test_loop_guard_quiet_when_not_captured(path, intercept):
    assert captured_paths([intercept], [CORP], [path]) == []


VALUES = st.recursive(st.one_of(st.integers(-5, 70000), st.booleans(), st.floats(allow_nan=False),
                                st.sampled_from(["corp", "direct", "reject", "socks5", "http",
                                                 "198.51.100.7:1080", "[2001:db8::1]:80", "10.0.0.0/8",
                                                 "1-2", "tcp", "udp", "/nonexistent", "x.example:1"]),
                                st.text(max_size=12)),
                      lambda inner: st.lists(inner, max_size=4), max_leaves=10)
UP_KEYS = st.sampled_from(["name", "type", "address", "username", "password_file", "udp",
                           "connect_timeout", "check_interval", "check_target", "via", "ports",
                           "sources", "destinations", "protocols", "x"])
TABLES = st.lists(st.one_of(st.dictionaries(UP_KEYS, VALUES, max_size=7), VALUES), max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={"upstream": st.one_of(TABLES, VALUES),
                                           "route": st.one_of(TABLES, VALUES)}))
def test_arbitrary_upstreams_and_routes_raise_only_config_error(doc):
    with contextlib.suppress(ConfigError):
        parse_document(doc)


def example_routing_block() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "tproxy.toml.example")) as f:
        text = f.read()
    block = text[text.index("# [[upstream]]"):]
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.splitlines())


def test_example_routing_block_is_documented_and_valid_once_uncommented(pw):
    block = example_routing_block()
    lines = block.splitlines()
    for key in (*loader.UPSTREAM_KEYS, *loader.ROUTE_KEYS):
        index = next((i for i, ln in enumerate(lines) if ln.startswith(f"{key} =")), None)
        assert index is not None, f"{key} missing from the example"
        assert lines[index - 1].startswith("#"), f"{key} has no comment"
    config = loads(block.replace("/etc/tproxyd/corp.password", pw))
    assert [u.name for u in config.upstreams] == ["corp", "backup"]
    assert [(r.name, r.via) for r in config.routes] == [("corp-nets", ("corp", "backup")),
                                                        ("code-hosts", ("corp",)),
                                                        ("no-telnet", ("reject",))]
    assert config.routes[1].domains == ("github.com", "githubusercontent.com", "=login.example.com")


def test_summary_names_everything_but_the_secret(pw):
    config = loads(SOCKS + f'username = "alice"\npassword_file = "{pw}"\nudp = true\n' + HTTPUP
                   + 'check_interval = 0\n[[route]]\nname = "corp-nets"\ndestinations = ["198.18.0.0/15"]\n'
                   'ports = [443, "8000-8999"]\nsources = ["198.18.1.0/24"]\nvia = ["corp", "web"]\n'
                   '[[route]]\nvia = "reject"\n')
    assert summary(config.upstreams, config.routes) == [
        f"upstream corp: socks5 198.51.100.7:1080, user alice (password from {pw}), udp, check every 10 s",
        "upstream web: http proxy.example.net:3128, passive checks only",
        "route corp-nets: tcp to 1 destinations ports 443, 8000-8999 from 1 sources -> corp, web",
        "route route1: tcp/udp everything -> reject",
    ]
