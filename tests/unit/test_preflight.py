"""Preflight judges host facts: each problem is named, with a fix, at the right level."""

from __future__ import annotations

from dataclasses import replace

from tproxyd.state.loader import loads
from tproxyd.state.preflight import ERROR, WARNING, HostFacts, check, errors
from tproxyd.state.routing import Route, Rule
from tproxyd.state.upstreams import UpstreamPath

CONFIG = loads('[routing]\nforwarding = false\n[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n')
GOOD = HostFacts(sysctls={"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                          "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.lan0.rp_filter": "2"},
                 interfaces=frozenset({"lo", "lan0"}))


def only(findings, level, words):
    hits = [f for f in findings if f.level == level and words in f.message]
    assert len(hits) == 1, findings
    assert hits[0].fix
    return hits[0]


def test_healthy_host_has_no_findings():
    assert check(CONFIG, GOOD) == []


def test_forwarding_off_is_a_warning_when_not_managed():
    facts = HostFacts(**{**GOOD.__dict__, "sysctls": {**GOOD.sysctls, "net.ipv4.ip_forward": "0"}})
    f = only(check(CONFIG, facts), WARNING, "IPv4 forwarding is off")
    assert "net.ipv4.ip_forward=1" in f.fix
    managed = loads('[[intercept]]\ninterfaces = ["lan0"]\n')
    assert check(managed, facts) == []  # apply turns it on itself


def test_strict_rp_filter_on_an_intercepted_interface():
    # the kernel uses max(all, interface): all=1 with the interface at 0 is strict too
    for values in ({"net.ipv4.conf.lan0.rp_filter": "1"},
                   {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.lan0.rp_filter": "0"}):
        facts = HostFacts(**{**GOOD.__dict__, "sysctls": {**GOOD.sysctls, **values}})
        only(check(CONFIG, facts), WARNING, "strict reverse-path filtering on lan0")
    loose = {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.lan0.rp_filter": "2"}
    assert check(CONFIG, HostFacts(**{**GOOD.__dict__, "sysctls": {**GOOD.sysctls, **loose}})) == []


def test_missing_interface_is_a_warning():
    facts = HostFacts(**{**GOOD.__dict__, "interfaces": frozenset({"lo"})})
    findings = check(CONFIG, facts)
    only(findings, WARNING, "interface lan0")
    assert errors(findings) == []


def test_br_netfilter_on_a_bridged_interface():
    sysctls = {**GOOD.sysctls, "net.bridge.bridge-nf-call-iptables": "1"}
    assert check(CONFIG, HostFacts(**{**GOOD.__dict__, "sysctls": sysctls})) == []  # no bridge
    facts = HostFacts(**{**GOOD.__dict__, "sysctls": sysctls, "bridged": frozenset({"lan0"})})
    only(check(CONFIG, facts), WARNING, "br_netfilter")


def test_kernel_support():
    facts = HostFacts(**{**GOOD.__dict__, "nft_error": "Could not process rule: No such file",
                         "policy_routing": {4: True, 6: False}})
    findings = check(CONFIG, facts)
    assert "modprobe nft_tproxy" in only(findings, ERROR, "refuses tproxyd's nftables table").fix
    only(findings, ERROR, "policy routing")


def test_someone_elses_rules_and_routes():
    rules = frozenset({
        Rule(4, 500, 100, protocol=3),  # looks up our table
        Rule(4, 600, 200, fwmark=1, fwmask=1, protocol=3),  # takes our mark first
        Rule(6, 10000, 300, fwmark=8, fwmask=8, protocol=3),  # same priority
        Rule(4, 10000, 100, fwmark=1, fwmask=1, protocol=201),  # ours: fine
        Rule(4, 20000, 200, fwmark=1, fwmask=1, protocol=3),  # our mark, but after us: fine
    })
    routes = frozenset({Route(4, 100, "198.18.0.0/15", "unicast", "eth0", protocol=3),
                        Route(4, 100, "0.0.0.0/0", protocol=3)})  # our slot: drift, not conflict
    findings = check(CONFIG, HostFacts(**{**GOOD.__dict__, "rules": rules, "table_routes": routes}))
    only(findings, ERROR, "looks up our table 100")
    only(findings, ERROR, "matches our intercept mark")
    only(findings, WARNING, "shares our priority")
    only(findings, ERROR, "holds a route tproxyd does not own")
    assert len(findings) == 4


def test_other_tables_using_our_marks_and_no_intercepts():
    facts = HostFacts(**{**GOOD.__dict__, "foreign_mark_users": ("inet fw chain pre (handle 4)",)})
    only(check(CONFIG, facts), WARNING, "uses our marks")
    only(check(loads("[relay]\n"), GOOD), WARNING, "nothing is captured")


def test_loop_guard_warns_for_an_upstream_captured_where_it_is_reached():
    config = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                   '[[upstream]]\nname = "corp"\ntype = "socks5"\naddress = "198.51.100.7:1080"\n')
    def paths(ifname):
        return HostFacts(**{**GOOD.__dict__,
                            "upstream_paths": (UpstreamPath("corp", "198.51.100.7", ifname),)})

    far = paths("wan0")
    assert check(config, far) == []
    (finding,) = check(config, paths("lan0"))
    assert finding.level == WARNING and "upstream 'corp'" in finding.message
    assert "exclude" in finding.fix


def test_domains_routes_need_no_warning_unless_quic_names_cannot_be_read():
    config = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                   '[[route]]\nname = "gh"\ndomains = ["github.com"]\nvia = "reject"\n')
    assert check(config, GOOD) == []
    (finding,) = check(config, replace(GOOD, quic_sniffing=False))  # no python3-cryptography
    assert finding.level == WARNING and "route gh: QUIC (UDP)" in finding.message
    assert "python3-cryptography" in finding.fix
    tcp_only = loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'
                     '[[route]]\nname = "gh"\ndomains = ["github.com"]\nvia = "reject"\n'
                     'protocols = ["tcp"]\n')
    assert check(tcp_only, replace(GOOD, quic_sniffing=False)) == []
