"""What a config renders to: rules, routes, sysctls, and an nft table whose sets hold the CIDRs."""

from __future__ import annotations

import json

from tproxyd.state.desired import render
from tproxyd.state.loader import loads
from tproxyd.state.nft import replace_table_commands, table_from_listing, table_from_ruleset


def nft_rules(table):
    return {c.name: [json.loads(r.expr) for r in c.rules] for c in table.chains}


def test_rules_routes_and_sysctls():
    d = render(loads('[routing]\ntable = 300\npriority = 900\nprotocol = 77\n'
                     '[marks]\nintercept = 0x10\n'
                     '[[intercept]]\ninterfaces = ["lan0"]\ndestinations = ["198.18.0.0/15"]\n'))
    assert {str(r) for r in d.rules} == {
        "rule ipv4 fwmark 0x10/0x10 lookup 300 pref 900 proto 77",
        "rule ipv6 fwmark 0x10/0x10 lookup 300 pref 900 proto 77"}
    assert {str(r) for r in d.routes} == {
        "route ipv4 local 0.0.0.0/0 dev lo table 300 proto 77",
        "route ipv6 local ::/0 dev lo table 300 proto 77 metric 1024"}
    assert d.sysctls == {"net.ipv4.ip_forward": "1"}  # IPv4 only: IPv6 forwarding left alone


def test_forwarding_can_be_left_alone():
    d = render(loads('[routing]\nforwarding = false\n[[intercept]]\ninterfaces = ["lan0"]\n'))
    assert d.sysctls == {}


def test_many_cidrs_are_one_set_and_one_rule():
    cidrs = ", ".join(f'"198.18.{i}.0/24"' for i in range(0, 256, 2))
    d = render(loads(f'[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\ndestinations = [{cidrs}]\n'))
    dst4 = d.nft.set_named("lan_dst4")
    assert dst4 is not None and len(dst4.elements) == 128
    assert d.nft.set_named("lan_dst6") is None
    (_, _, capture) = nft_rules(d.nft)["intercept_lan"]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": "@lan_dst4"}} in capture
    assert {"tproxy": {"family": "ip", "port": 12345}} in capture


def test_exemptions_come_first_and_ports_use_a_set():
    d = render(loads('[marks]\nrelay = 0x4\n[[intercept]]\nname = "lan"\ninterfaces = ["lan0", "lan1"]\n'
                     'protocols = ["tcp"]\nports = [443, "8000-8999"]\nexclude = ["198.18.5.0/24"]\n'))
    pre = nft_rules(d.nft)["prerouting"]
    assert pre[0][0]["match"]["right"] == 4  # relay mark
    # replies to the relay's own connections: by conntrack alone, no lookup
    assert pre[1][:2] == [
        {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
        {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 4]}, "right": 4}}]
    assert pre[2] == [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                 "right": {"set": ["lan0", "lan1"]}}},
                      {"jump": {"target": "intercept_lan"}}]
    # the socket lookup only where conntrack cannot say
    assert pre[3][0] == {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 4]},
                                   "right": 4}}
    assert pre[4][0] == {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                   "right": ["new", "invalid", "untracked"]}}
    socket = {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 1}}
    assert socket in pre[3] and socket in pre[4] and len(pre) == 5
    # outside intercepted interfaces only the relay's outbound sockets (the relay mark) count
    outbound = {"match": {"op": "==", "left": {"&": [{"socket": {"key": "mark"}}, 4]}, "right": 4}}
    assert outbound in pre[3] and outbound in pre[4]
    chain = nft_rules(d.nft)["intercept_lan"]
    assert socket in chain[0] and outbound not in chain[0]  # later packets of captured ones
    assert chain[1][0]["match"]["left"] == {"fib": {"result": "type", "flags": ["daddr"]}}
    assert chain[2][1] == {"return": None}  # exclusions before capture
    assert {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}} in chain[3]
    assert d.nft.set_named("lan_ports").elements == ((443, 443), (8000, 8999))


def test_replace_commands_read_back_as_the_same_table():
    """The commands we send, listed back the way the kernel lists them, compare equal."""
    d = render(loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\nports = [53]\n'
                     'exclude = ["198.18.0.0/15", "2001:db8::/32"]\n'))
    cmds = replace_table_commands(d.nft)
    assert cmds[:3] == [{"add": {"table": {"family": "inet", "name": "tproxyd"}}},
                        {"delete": {"table": {"family": "inet", "name": "tproxyd"}}},
                        {"add": {"table": {"family": "inet", "name": "tproxyd"}}}]
    listing = [{"table": {"family": "inet", "name": "tproxyd"}}]
    elements = {c["add"]["element"]["name"]: c["add"]["element"]["elem"]
                for c in cmds if "element" in c.get("add", {})}
    for c in cmds:
        obj = c.get("add", {})
        if "set" in obj:
            listing.append({"set": {**obj["set"], "elem": elements.get(obj["set"]["name"], [])}})
        elif "chain" in obj or "rule" in obj:
            listing.append(obj)
    live = table_from_listing("tproxyd", listing)
    assert live.structure() == d.nft.structure()
    assert {s.name: s.elements for s in live.sets} == {s.name: s.elements for s in d.nft.sets}


def test_our_table_is_picked_out_of_the_whole_ruleset():
    d = render(loads('[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'))
    ruleset = [{"metainfo": {"version": "1.0.6"}},
               {"table": {"family": "ip", "name": "tproxyd"}},
               {"chain": {"family": "ip", "table": "tproxyd", "name": "prerouting"}},
               {"table": {"family": "inet", "name": "other"}},
               {"set": {"family": "inet", "table": "other", "name": "lan_dst4", "type": "ipv4_addr"}}]
    assert table_from_ruleset("tproxyd", ruleset) is None
    ruleset += [{"table": {"family": "inet", "name": "tproxyd"}}]
    ruleset += [{"set": {"family": "inet", "table": "tproxyd", "name": s.name, "type": s.type,
                         "flags": list(s.flags)}} for s in d.nft.sets]
    live = table_from_ruleset("tproxyd", ruleset)
    assert [s.name for s in live.sets] == [s.name for s in d.nft.sets] and live.chains == ()


def test_redirect_mode_captures_in_a_nat_chain():
    d = render(loads('[relay]\nmode = "redirect"\n[[intercept]]\nname = "lan"\ninterfaces = ["lan0"]\n'))
    chains = {c.name: c for c in d.nft.chains}
    assert (chains["redirect"].type, chains["redirect"].hook, chains["redirect"].prio) == (
        "nat", "prerouting", -100)
    fib, *capture = nft_rules(d.nft)["intercept_lan"]
    assert "fib" in json.dumps(fib)
    assert all({"redirect": {"port": 12345}} in rule for rule in capture)
    assert not any("tproxy" in json.dumps(rule) for rule in capture)
    # replies to spoofed sockets still need the mangle chain's socket rule
    assert any("socket" in json.dumps(r) for r in nft_rules(d.nft)["prerouting"])
    (entry,) = loads('[relay]\nmode = "redirect"\n[[intercept]]\ninterfaces = ["x"]\n').intercepts
    assert entry.protocols == ("tcp",)


def test_no_intercept_wants_nothing_on_the_host():
    """Issue 15 item 4: the shipped config (no [[intercept]]) still added the fwmark rules, the
    route table, an nft table and the forwarding sysctl."""
    d = render(loads("[routing]\nforwarding = true\n"))
    assert d.idle and d.nft is None
    assert d.rules == frozenset() and d.routes == frozenset() and dict(d.sysctls) == {}
