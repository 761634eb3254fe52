"""`tproxy` against the real kernel, inside the lab's gateway namespace: convergence, idempotency
(counted kernel writes), drift reported and repaired, ownership, and a clean `down`."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

from lab import Lab
from tests.conftest import Tproxy
from tproxyd.state.desired import render
from tproxyd.state.intervals import from_elements
from tproxyd.state.loader import load

pytestmark = pytest.mark.kernel

BASE_RULES = {4: {0, 32766, 32767}, 6: {0, 32766}}


def rules(lab: Lab, family: int) -> list:
    return json.loads(lab.run(lab.gw, "ip", "-j", f"-{family}", "rule", "show").stdout)


def routes(lab: Lab, family: int, table: str) -> list:
    return json.loads(lab.run(lab.gw, "ip", "-j", f"-{family}", "route", "show", "table", table).stdout)


def ruleset(lab: Lab) -> str:
    return lab.run(lab.gw, "nft", "list", "ruleset").stdout


def sysctl(lab: Lab, key: str) -> str:
    return lab.run(lab.gw, "sysctl", "-n", key).stdout.strip()


def test_apply_converges_and_a_second_apply_writes_nothing(lab: Lab, tproxy: Tproxy):
    assert tproxy("plan").returncode == 2
    first = tproxy.json("apply")
    # the lab turned forwarding on already: 2 rules, 2 routes, 1 nft transaction
    assert [c["op"] for c in first["changes"]] == ["AddRoute", "AddRoute", "AddRule", "AddRule",
                                                    "ReplaceNftTable"]
    assert first["writes"] == 5

    for family in (4, 6):
        ours = [r for r in rules(lab, family) if r["priority"] == 10000]
        assert ours == [{"priority": 10000, "src": "all", "fwmark": "0x1", "fwmask": "0x1", "table": "100",
                         "protocol": "201"}]
        (route,) = routes(lab, family, "100")
        assert (route["type"], route["dst"], route["dev"], route["protocol"]) == (
            "local", "default", "lo", "201")
    text = ruleset(lab)
    assert "table inet tproxyd" in text and "tproxy ip to :12345" in text
    assert "tproxy ip6 to :12345" in text and "socket transparent 1" in text

    second = tproxy.json("apply")
    assert second == {**second, "changes": [], "writes": 0}
    assert tproxy("plan").returncode == 0
    status = tproxy.json("status")
    assert status["in_sync"] and all(o["state"] == "in sync" for o in status["objects"])


DRIFT = {
    "rule deleted": (["ip", "rule", "del", "pref", "10000"], "rule"),
    "ipv6 rule deleted": (["ip", "-6", "rule", "del", "pref", "10000"], "rule"),
    "route changed": (["ip", "route", "replace", "local", "default", "dev", "lo", "table", "100",
                       "proto", "static"], "route"),
    "route deleted": (["ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100"],
                      "route"),
    "table flushed": (["nft", "flush", "table", "inet", "tproxyd"], "nft table"),
    "table deleted": (["nft", "delete", "table", "inet", "tproxyd"], "nft table"),
    "rule added to our chain": (["nft", "add", "rule", "inet", "tproxyd", "prerouting", "counter"],
                                "nft table"),
    "set element added": (["nft", "add", "element", "inet", "tproxyd", "lan_dst4",
                           "{ 198.18.9.0/24 }"], "nft set"),
    "set flushed": (["nft", "flush", "set", "inet", "tproxyd", "lan_dst6"], "nft set"),
    "forwarding turned off": (["sysctl", "-qw", "net.ipv4.ip_forward=0"], "sysctl"),
}


@pytest.mark.parametrize("name", list(DRIFT))
def test_drift_is_reported_and_repaired(lab: Lab, tproxy: Tproxy, name: str):
    command, kind = DRIFT[name]
    tproxy("apply", check=True)
    lab.run(lab.gw, *command)

    status = tproxy("status")
    assert status.returncode == 2, status.stdout
    report = tproxy.json("status")
    assert not report["in_sync"]
    assert any(o["kind"] == kind and o["state"] != "in sync" for o in report["objects"]), report
    assert tproxy("plan").returncode == 2

    repaired = tproxy.json("apply")
    assert repaired["changes"] and repaired["writes"] >= 1
    assert tproxy.json("status")["in_sync"]
    assert tproxy.json("apply")["writes"] == 0


def test_someone_elses_rules_routes_and_tables_survive_apply_and_down(lab: Lab, tproxy: Tproxy):
    lab.run(lab.gw, "ip", "rule", "add", "fwmark", "0x10", "lookup", "200", "pref", "500")
    lab.run(lab.gw, "ip", "-6", "rule", "add", "from", "2001:db8:1::/64", "lookup", "300",
            "pref", "600", "proto", "static")
    lab.run(lab.gw, "ip", "route", "add", "198.18.77.0/24", "dev", "lo", "table", "200")
    lab.run(lab.gw, "ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "300",
            "proto", "201")  # our protocol tag, but not our table: not ours
    lab.run(lab.gw, "nft", "add", "table", "inet", "firewall")
    lab.run(lab.gw, "nft", "add", "chain", "inet", "firewall", "input",
            "{ type filter hook input priority 0; policy accept; }")
    before = {f: rules(lab, f) for f in (4, 6)}, routes(lab, 4, "200"), routes(lab, 6, "300")

    tproxy("apply", check=True)
    assert "table inet firewall" in ruleset(lab)
    tproxy("down", check=True)

    after = {f: rules(lab, f) for f in (4, 6)}, routes(lab, 4, "200"), routes(lab, 6, "300")
    assert after == before
    assert "table inet firewall" in ruleset(lab) and "tproxyd" not in ruleset(lab)


def test_down_leaves_nothing_behind_and_restores_sysctls(lab: Lab, tproxy: Tproxy):
    lab.sysctl(lab.gw, "net.ipv4.ip_forward", "0")
    lab.sysctl(lab.gw, "net.ipv6.conf.all.forwarding", "0")
    tproxy("apply", check=True)
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"
    assert sysctl(lab, "net.ipv6.conf.all.forwarding") == "1"

    down = tproxy("down", check=True)
    assert "- nft table inet tproxyd" in down.stdout
    for family in (4, 6):
        assert {r["priority"] for r in rules(lab, family)} == BASE_RULES[family]
        assert routes(lab, family, "100") == []
    assert ruleset(lab).strip() == ""
    assert sysctl(lab, "net.ipv4.ip_forward") == "0"
    assert sysctl(lab, "net.ipv6.conf.all.forwarding") == "0"
    assert "nothing to remove" in tproxy("down", check=True).stdout


def test_down_with_a_tampered_sysctl_record_writes_nothing_outside_proc_sys(lab: Lab, tproxy: Tproxy):
    """The record of sysctls to restore lives in state_dir; `down` writes what it holds as root.
    Keys that would lead out of /proc/sys (an absolute or a .. interface part) are dropped with
    a warning naming the record; the entries tproxyd wrote are still restored."""
    lab.sysctl(lab.gw, "net.ipv4.ip_forward", "0")
    tproxy("apply", check=True)
    (record,) = glob.glob(os.path.join(lab.tmp, "state", "sysctl-netns-*.json"))
    victims = [os.path.join(lab.tmp, "victim1"), os.path.join(lab.tmp, "victim2")]
    assert "." not in "".join(victims)  # a dot would split the planted key differently
    for v in victims:
        os.mkdir(v)
    with open(record) as f:
        saved = json.load(f)
    saved[f"net.ipv4.conf.{victims[0]}.rp_filter"] = "1"
    saved[f"net.ipv4.conf.lo/{'../' * 8}{victims[1]}.rp_filter"] = "1"
    with open(record, "w") as f:
        json.dump(saved, f)

    down = tproxy("down")
    assert down.returncode == 0, down.stderr
    assert [os.listdir(v) for v in victims] == [[], []]
    assert record in down.stderr
    assert sysctl(lab, "net.ipv4.ip_forward") == "0"
    assert ruleset(lab).strip() == ""


def test_down_keeps_a_sysctl_that_was_already_on(lab: Lab, tproxy: Tproxy):
    """The lab turned forwarding on before tproxyd: down must not turn it off."""
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"
    tproxy("apply", check=True)
    tproxy("down", check=True)
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"


def test_preflight_error_stops_apply_before_any_change(lab: Lab, tproxy: Tproxy):
    lab.run(lab.gw, "ip", "route", "add", "198.18.77.0/24", "dev", "lo", "table", "100")
    result = tproxy("apply")
    assert result.returncode == 1
    assert "table 100 holds a route tproxyd does not own" in result.stderr
    assert "nothing was changed" in result.stderr
    assert ruleset(lab).strip() == ""
    assert {r["priority"] for r in rules(lab, 4)} == BASE_RULES[4]
    check = tproxy("check")
    assert check.returncode == 1 and "fix:" in check.stdout


def test_config_errors_change_nothing(lab: Lab, tproxy: Tproxy):
    tproxy("apply", check=True)
    before = ruleset(lab)
    bad = Tproxy(lab, lab.write_config('[routing]\ntable = 254\n', "bad.toml"))
    for command in ("check", "plan", "apply", "down"):
        result = bad(command)
        assert result.returncode == 1
        assert "bad.toml: routing.table: table 254 is the kernel's 'main' table" in result.stderr
    assert ruleset(lab) == before


def nft_set(lab: Lab, name: str, set_type: str = "ipv4_addr"):
    """A set's contents as nft itself lists them: a reader independent of ours."""
    out = json.loads(lab.run(lab.gw, "nft", "-j", "list", "set", "inet", "tproxyd", name).stdout)
    (found,) = [o["set"] for o in out["nftables"] if "set" in o]
    return from_elements(set_type, found.get("elem", []))


def test_set_changes_move_only_the_ranges_that_changed(lab: Lab):
    cidrs = [f"198.18.{i // 128}.{i % 128 * 2}/32" for i in range(1, 3001)]  # 3,000 ranges

    def config(items):
        listed = ", ".join(f'"{c}"' for c in items)
        return Tproxy(lab, lab.write_config(lab.config(destinations=f"[{listed}]")))

    config(cidrs).json("apply")
    grown = config([*cidrs, "198.19.0.0/24"])
    plan = grown.json("plan")["changes"]
    assert [(c["op"], c["added"], c["removed"]) for c in plan] == [("UpdateNftSet", 1, 0)]
    assert grown.json("apply")["writes"] == 1

    shrunk = config(cidrs[:-30])
    plan = shrunk.json("plan")["changes"]
    assert [(c["op"], c["added"], c["removed"]) for c in plan] == [("UpdateNftSet", 0, 31)]
    assert shrunk.json("apply")["writes"] == 1
    assert shrunk.json("status")["in_sync"]
    assert shrunk.json("apply")["writes"] == 0
    assert nft_set(lab, "lan_dst4") == want(shrunk, "lan_dst4")


def want(tproxy: Tproxy, name: str):
    return render(load(tproxy.config)).nft.set_named(name).elements


def test_big_sets_load_and_change_in_one_netlink_batch_each(lab: Lab):
    """Past 10,000 ranges a set is filled by our own nfnetlink batch, not libnftables: nft must
    list exactly the ranges asked for, after a fresh load and after a 1% change."""
    cidrs = [f"198.18.{i // 128}.{i % 128 * 2}/32" for i in range(12_000)]

    def config(items, exclude="[]"):
        listed = ", ".join(f'"{c}"' for c in items)
        return Tproxy(lab, lab.write_config(lab.config(destinations=f"[{listed}]", exclude=exclude)))

    full = config(cidrs, exclude='["198.18.0.0/32"]')
    assert full.json("apply")["writes"] > 0
    assert nft_set(lab, "lan_dst4") == want(full, "lan_dst4") and len(want(full, "lan_dst4")) == 12_000
    changed = config(cidrs[120:] + [f"198.19.{2 * i}.0/24" for i in range(120)] + ["255.255.255.0/24"],
                     exclude='["198.18.0.0/32"]')
    plan = changed.json("plan")["changes"]
    assert [(c["op"], c["added"], c["removed"]) for c in plan] == [("UpdateNftSet", 121, 120)]
    assert changed.json("apply")["writes"] == 1
    assert nft_set(lab, "lan_dst4") == want(changed, "lan_dst4")
    assert "255.255.255.0/24" in lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd",
                                         "lan_dst4").stdout  # an open range prints as nft's own
    assert changed.json("apply")["writes"] == 0
    assert changed.json("status")["in_sync"]


STALE_BATCH = """
import json, sys
from tproxyd.reconciler.nfnetlink import GenerationMoved, NftNetlink, SetChange
nl = NftNetlink()
seen = nl.generation()
import subprocess
subprocess.run(["nft", "add", "element", "inet", "tproxyd", "lan_dst4", "{ 198.19.9.9 }"], check=True)
try:
    nl.change_sets("tproxyd", [SetChange("lan_dst4", "ipv4_addr", add=((0x0A000000, False, False),
                                                                   (0x0A000001, True, False)))], seen)
except GenerationMoved as exc:
    print("refused:", exc)
"""


def test_a_batch_planned_at_an_old_generation_is_refused_and_apply_repairs(lab: Lab, tproxy: Tproxy):
    tproxy.json("apply")
    out = lab.run(lab.gw, sys.executable, "-c", STALE_BATCH).stdout
    assert "refused: nfnetlink: ERESTART: nftables moved on from generation" in out
    assert "10.0.0.0" not in ruleset(lab)  # nothing of the refused batch was committed
    # the hand-added element moved the generation: the next apply reads the set and removes it
    assert tproxy.json("plan")["changes"][0]["removed"] == 1
    assert tproxy.json("apply")["writes"] == 1
    assert nft_set(lab, "lan_dst4") == want(tproxy, "lan_dst4")


def test_a_set_laid_out_by_hand_is_emptied_and_reloaded(lab: Lab, tproxy: Tproxy):
    """`nft add element` of a range next to ours leaves two ranges where we would keep one:
    deleting our one range's boundaries would leave the hand-made ones behind, so the set is
    flushed and loaded whole, in one batch."""
    tproxy.json("apply")
    lab.run(lab.gw, "nft", "add", "element", "inet", "tproxyd", "lan_dst4", "{ 198.18.3.0/24 }")
    (change,) = tproxy.json("plan")["changes"]
    assert (change["op"], change["added"], change["removed"]) == ("UpdateNftSet", 1, 1)
    assert tproxy.json("apply")["writes"] == 1
    assert nft_set(lab, "lan_dst4") == want(tproxy, "lan_dst4")
    listed = lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd", "lan_dst4").stdout
    assert "198.18.2.0/24" in listed and "198.18.3.0" not in listed
    assert tproxy.json("apply")["writes"] == 0


RACING_APPLY = """
import subprocess, sys
from tproxyd.reconciler import nfnetlink
from tproxyd.reconciler.reconcile import Reconciler
from tproxyd.state.loader import load

real, raced = nfnetlink.NftNetlink.change_sets, []

def racing(self, table, changes, genid):
    if not raced:  # someone commits between our plan and our batch, once
        raced.append(1)
        subprocess.run(["nft", "add", "element", "inet", "tproxyd", "lan_dst4", "{ 198.19.7.7 }"],
                       check=True)
    return real(self, table, changes, genid)

nfnetlink.NftNetlink.change_sets = racing
result = Reconciler(load(sys.argv[1])).apply()
print("raced", len(raced), "ops", len(result.ops))
"""


def test_apply_plans_again_when_nftables_moves_under_it(lab: Lab, tproxy: Tproxy):
    tproxy.json("apply")
    grown = Tproxy(lab, lab.write_config(lab.config(
        destinations='["198.18.2.0/24", "198.18.9.0/24", "2001:db8:2::/64"]'), "grown.toml"))
    out = lab.run(lab.gw, sys.executable, "-c", RACING_APPLY, grown.config)
    assert "raced 1" in out.stdout
    # the second plan saw the intruder and removed it with the change it was asked for
    assert nft_set(lab, "lan_dst4") == want(grown, "lan_dst4")
    assert grown.json("apply")["writes"] == 0


def test_a_range_that_is_not_one_prefix_survives_later_edits(lab: Lab):
    """198.18.4.0-198.18.6.255 is no single prefix. nft must hold it as one interval (as our own
    batches would), or a later edit that deletes the range's two boundaries leaves the inner
    ones behind and the set matches addresses nobody configured."""
    def config(dests, exclude):
        return Tproxy(lab, lab.write_config(lab.config(destinations=dests, exclude=exclude)))

    three = '["198.18.4.0/24", "198.18.5.0/24", "198.18.6.0/24"]'
    first = config('["198.18.0.0/15"]', three)
    first.json("apply")
    # a contents change elsewhere: the batch records every set as known
    assert config('["198.18.0.0/15", "198.20.0.0/24"]', three).json("apply")["writes"] == 1
    last = config('["198.18.0.0/15", "198.20.0.0/24"]', '["198.18.4.0/24", "198.18.5.0/24"]')
    assert last.json("apply")["writes"] == 1
    assert nft_set(lab, "lan_exclude4") == want(last, "lan_exclude4")
    assert "198.18.6" not in lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd",
                                     "lan_exclude4").stdout
    assert last.json("status")["in_sync"] and last.json("apply")["writes"] == 0
