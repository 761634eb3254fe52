"""Issue 13's keys: [[route]] domains, [[upstream]] send_domain, [relay] sniff_timeout; the
normalisation of names (case, trailing dot, IDNA 2008) and every refusal with its key path."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.state.domains import DomainError, entry, normalise, sniffed
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import loads
from tproxyd.state.upstreams import RouteRule, summary

SOCKS = '[[upstream]]\nname = "corp"\ntype = "socks5"\naddress = "198.51.100.7:1080"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "t.toml")
    return str(info.value).splitlines()


def assert_refused(text: str, where: str, words: str) -> None:
    lines = problems(text)
    assert any(ln.startswith(f"t.toml: {where}:") and words in ln for ln in lines), lines


def route(domains: str) -> str:
    return SOCKS + f'[[route]]\ndomains = {domains}\nvia = "corp"\n'


def test_defaults():
    config = loads(SOCKS)
    assert config.relay.sniff_timeout == 0.3
    assert config.upstreams[0].send_domain is True
    assert loads(SOCKS + '[[route]]\nvia = "corp"\n').routes[0].domains is None


def test_domains_are_normalised_and_kept_in_order():
    config = loads(route('["GitHub.com.", "=Login.Example.COM", "github.com", "bücher.example"]'))
    assert config.routes[0].domains == ("github.com", "=login.example.com", "xn--bcher-kva.example")


def test_idna_2008_not_2003():
    # IDNA 2003 (the stdlib codec) folds ß to ss: a different domain than browsers send
    assert normalise("faß.de") == "xn--fa-hia.de"
    assert normalise("FASS.de") == "fass.de"
    assert normalise("xn--fa-hia.de") == "xn--fa-hia.de"
    assert normalise("ÄÖÜ.example") == "xn--4ca0bs.example"  # UTS 46 maps case first


def test_send_domain_and_sniff_timeout_read():
    config = loads(SOCKS + "send_domain = false\n[relay]\nsniff_timeout = 1.5\n")
    assert config.upstreams[0].send_domain is False
    assert config.relay.sniff_timeout == 1.5
    assert "sniffed names not sent" in summary(config.upstreams, ())[0]


@pytest.mark.parametrize("value, words", [
    ('"github.com"', "must be an array"),
    ("[]", "is empty, so the route would match nothing"),
])
def test_domains_refused_as_a_whole(value, words):
    assert_refused(route(value), "route[0].domains", words)


@pytest.mark.parametrize("name, words", [
    ('""', "is empty"),
    ('"."', "is empty"),
    ("1", "must be a string"),
    ('"*.example.com"', "no wildcards"),
    ('"exa mple.com"', "label 'exa mple'"),
    ('"-bad.example"', "label '-bad'"),
    ('"bad-.example"', "label 'bad-'"),
    ('"a..example"', "label ''"),
    ('"under_score.example"', "label 'under_score'"),
    ('"' + "a" * 64 + '.example"', "label"),
    ('"' + ".".join(["abcdefghi"] * 26) + '"', "longer than 253"),
    ('"192.168.1.1"', "looks like an IP address"),
    ('"2001:db8::1"', "label '2001:db8::1'"),
    ('"=="', "label '='"),
    ('"xn--zz.example"', "not valid punycode"),
    ('"a\u200db.example"', "not a valid internationalised name"),  # ZWJ outside its context
])
def test_each_bad_name_refused_with_its_index(name, words):
    assert_refused(route(f'["ok.example", {name}]'), "route[0].domains[1]", words)


def test_every_bad_name_reported_at_once():
    lines = problems(route('["-a.example", "ok.example", "*.b"]'))
    assert [ln.split(":")[1].strip() for ln in lines] == ["route[0].domains[0]", "route[0].domains[2]"]


@pytest.mark.parametrize("text, where, words", [
    (SOCKS + 'send_domain = "yes"\n', "upstream[0].send_domain", "must be true or false"),
    (SOCKS + "[relay]\nsniff_timeout = 0\n", "relay.sniff_timeout", "out of range"),
    (SOCKS + "[relay]\nsniff_timeout = 11\n", "relay.sniff_timeout", "out of range"),
    (SOCKS + '[relay]\nsniff_timeout = "0.3"\n', "relay.sniff_timeout", "must be a number"),
])
def test_other_refusals(text, where, words):
    assert_refused(text, where, words)


def test_entry_and_sniffed():
    assert entry("=A.b") == "=a.b"
    with pytest.raises(DomainError):
        entry("=")
    assert sniffed("WWW.GitHub.com.") == "www.github.com"
    assert sniffed("_acme.example") == "_acme.example"
    for bad in ("", "10.0.0.1", "a..b", "bü.example", "a b", "x" * 254, "-"[:0] + "a.-"[:0]):
        assert sniffed(bad) is None


def test_route_with_domains_survives_pickle():
    rule = RouteRule(name="r", via=("direct",), domains=("a.example", "=b.example"))
    assert pickle.loads(pickle.dumps(rule)) == rule
    assert "named 2 domains" in summary((), [rule])[0]


def test_sniff_notes_for_tproxy_check():
    from tproxyd.state.domains import quic_sniffing_available, sniff_notes

    config = loads(SOCKS + 'udp = true\n[[route]]\nname = "names"\ndomains = ["a.example"]\nvia = "corp"\n'
                   '[[route]]\nname = "tcp-names"\ndomains = ["b.example"]\nprotocols = ["tcp"]\n'
                   'via = "corp"\n')
    assert sniff_notes(config.routes, quic=True) == []
    (note,) = sniff_notes(config.routes, quic=False)
    assert note.startswith("route names: QUIC (UDP) connections are routed without a name")
    assert quic_sniffing_available()  # python3-cryptography is in .ci/setup


def test_upstream_target_is_the_name_only_with_send_domain():
    config = loads(SOCKS + '[[upstream]]\nname = "web"\ntype = "http"\naddress = "proxy.example:3128"\n'
                   "send_domain = false\n")
    corp, web = config.upstreams
    assert corp.target("203.0.113.5", "github.com") == "github.com"
    assert corp.target("203.0.113.5") == corp.target("203.0.113.5", None) == "203.0.113.5"
    assert web.target("203.0.113.5", "github.com") == "203.0.113.5"


LETTERS = st.sampled_from([*list("abcxyz019-"), "ä", "ß", "é", "ü", "ж", "中", "A", "Z", "É"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(LETTERS, min_size=1, max_size=12), min_size=1, max_size=4), st.booleans())
def test_normalise_is_idempotent_and_what_the_sniffer_keys_on(labels, dot):
    text = ".".join(labels) + ("." if dot else "")
    try:
        name = normalise(text)
    except DomainError:
        return
    assert normalise(name) == name  # the A-label form is its own normal form
    assert sniffed(name) == name  # a client sending this name is matched by this entry
    assert sniffed(name.upper() + ".") == name
    assert name.isascii() and name == name.lower() and not name.endswith(".")
