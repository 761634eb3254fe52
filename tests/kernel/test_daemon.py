"""The tproxyd daemon as people run it: edit the TOML and the gateway follows; drift is repaired;
the relay is supervised and reloaded without dropping a connection; stopping leaves the host
as it was. Every wait polls with a deadline."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lab import LAN, WAN, Lab, wait_for_port
from tproxyd.reconciler.daemon import query

pytestmark = pytest.mark.kernel
DEADLINE = 2.0  # the promise: a save or a drift converges within 2 seconds


def eventually(predicate, what: str, timeout: float = DEADLINE, step: float = 0.02):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(step)


class Tproxyd:
    """One daemon process in the lab's gateway, on a config in a directory of its own."""

    def __init__(self, lab: Lab, body: str, layout: str = "plain", env: dict | None = None):
        self.lab, self.layout = lab, layout
        self.dir = os.path.join(lab.tmp, "etc")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "tproxy.toml")
        self.generation = 0
        if layout == "configmap":
            self._configmap(body)
        else:
            with open(self.path, "w") as f:
                f.write(body)
        self.socket = f"{lab.tmp}/state/tproxyd.sock"
        self.proc = lab.spawn(lab.gw, sys.executable, "-m", "tproxyd.reconciler.daemon",
                              "-c", self.path, env=env)
        eventually(lambda: self.status(), "the daemon to answer", timeout=15)
        wait_for_port(lab, lab.gw, 12345)

    def status(self) -> dict | None:
        try:
            return query(self.socket)
        except OSError:
            assert self.proc.poll() is None, self.lab.log_of(self.proc)
            return None

    def _configmap(self, body: str) -> None:
        """Kubernetes' ConfigMap volume: files in a timestamped dir, `..data` a symlink to it,
        each key a symlink through `..data`; an update swaps `..data` atomically."""
        self.generation += 1
        stamp = os.path.join(self.dir, f"..2026_11_25_{self.generation}")
        os.mkdir(stamp)
        with open(os.path.join(stamp, "tproxy.toml"), "w") as f:
            f.write(body)
        tmp = os.path.join(self.dir, "..data_tmp")
        os.symlink(os.path.basename(stamp), tmp)
        data = os.path.join(self.dir, "..data")
        old = os.path.realpath(data) if os.path.lexists(data) else None
        os.rename(tmp, data)
        if not os.path.lexists(self.path):
            os.symlink("..data/tproxy.toml", self.path)
        if old is not None:
            shutil.rmtree(old)

    def save(self, body: str, how: str = "in place") -> None:
        if how == "in place":
            with open(self.path, "r+") as f:
                f.truncate(0)
                f.write(body)
        elif how == "rename":  # editors: write a temporary file, rename it over the config
            tmp = os.path.join(self.dir, ".tproxy.toml.swp")
            with open(tmp, "w") as f:
                f.write(body)
            os.rename(tmp, self.path)
        elif how == "sed -i":  # writes a new file beside the old and renames it over
            new = os.path.join(self.dir, "..new")
            with open(new, "w") as f:
                f.write(body)
            subprocess.run(["sed", "-i", "-n", f"1r {new}", self.path], check=True)
            os.unlink(new)
        elif how == "configmap":
            self._configmap(body)
        else:
            raise ValueError(how)

    def stop(self) -> int:
        return self.lab.stop(self.proc, timeout=60)

    def tproxy(self, *args: str) -> subprocess.CompletedProcess:
        """The CLI, in the gateway's namespace, on this daemon's config."""
        return self.lab.run(self.lab.gw, sys.executable, "-m", "tproxyd.reconciler.cli", *args,
                            "-c", self.path, check=False)


def config(lab: Lab, extra: str = "", **intercept: str) -> str:
    intercept.setdefault("destinations", '["198.18.2.0/24", "2001:db8:2::/64"]')
    return lab.config(extra=extra, **intercept)


def dst4(lab: Lab) -> str:
    return lab.run(lab.gw, "nft", "list", "set", "inet", "tproxyd", "lan_dst4", check=False).stdout


@pytest.mark.parametrize("how", ["in place", "rename", "sed -i", "configmap"])
def test_each_way_of_saving_converges_within_2_seconds(lab: Lab, how: str):
    layout = "configmap" if how == "configmap" else "plain"
    d = Tproxyd(lab, config(lab), layout)
    assert "198.18.2.0/24" in dst4(lab) and "198.19.0.0/16" not in dst4(lab)
    d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16"]'), how)
    eventually(lambda: "198.19.0.0/16" in dst4(lab), f"a {how} save to converge")
    d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16", "198.18.9.0/24"]'), how)
    eventually(lambda: "198.18.9.0/24" in dst4(lab), f"a second {how} save to converge")


def test_a_burst_of_50_writes_is_a_handful_of_reconciles(lab: Lab):
    d = Tproxyd(lab, config(lab))
    before = d.status()["reconciles"]
    for i in range(50):
        d.save(config(lab, destinations=f'["198.18.2.0/24", "198.19.{i}.0/24"]'), "rename")
    eventually(lambda: "198.19.49.0/24" in dst4(lab), "the last write to converge")
    time.sleep(0.5)  # let a trailing debounce fire, so the count is complete
    assert d.status()["reconciles"] - before <= 6


def serve_body(lab: Lab, size: int) -> str:
    """A random file at http://server:8080/body (python's http.server); returns its digest."""
    data = os.urandom(size)
    with open(os.path.join(lab.tmp, "body"), "wb") as f:
        f.write(data)
    lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::", "--directory",
              lab.tmp, "8080")
    wait_for_port(lab, lab.server, 8080)
    return hashlib.sha256(data).hexdigest()


def test_an_invalid_save_keeps_the_rules_and_a_live_transfer(lab: Lab):
    digest = serve_body(lab, 30 << 20)
    d = Tproxyd(lab, config(lab))
    ruleset = lab.run(lab.gw, "nft", "list", "ruleset").stdout
    transfer = lab.spawn(lab.client, "sh", "-c", f"curl -sS --limit-rate 15M "
                                                 f"http://{WAN.peer4}:8080/body | sha256sum")
    time.sleep(0.3)
    d.save('[relay]\nport = 70000\n[[intercept]]\ninterfaces = ["lan0"]\n')
    status = eventually(lambda: (s := d.status()) and s["config_error"] and s, "the error in status")
    assert f"{d.path}: relay.port: 70000 is out of range" in status["config_error"]
    d.save("[relay\n")
    eventually(lambda: "TOML syntax" in (d.status()["config_error"] or ""), "the syntax error")
    assert f"{d.path}:1:" in d.status()["config_error"]
    assert lab.run(lab.gw, "nft", "list", "ruleset").stdout == ruleset
    assert transfer.wait(timeout=60) == 0
    assert lab.log_of(transfer).split()[0] == digest
    out = d.tproxy("status")
    assert out.returncode == 1 and "TOML syntax" in out.stderr  # the CLI refuses the file too
    d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16"]'))
    eventually(lambda: "198.19.0.0/16" in dst4(lab), "the fixed save to converge")
    assert d.status()["config_error"] is None


DRIFT = {
    "rule deleted": ["ip", "rule", "del", "pref", "10000"],
    "route changed": ["ip", "route", "replace", "local", "default", "dev", "lo", "table", "100",
                      "proto", "static"],
    "table flushed": ["nft", "flush", "table", "inet", "tproxyd"],
    "table deleted": ["nft", "delete", "table", "inet", "tproxyd"],
}


@pytest.mark.parametrize("name", list(DRIFT))
def test_drift_is_repaired_within_2_seconds(lab: Lab, name: str):
    d = Tproxyd(lab, config(lab))
    lab.run(lab.gw, *DRIFT[name])

    def repaired() -> bool:
        return d.tproxy("plan").returncode == 0

    eventually(repaired, f"{name} to be repaired")


def worker_pids(d: Tproxyd) -> list[int]:
    return [w["pid"] for w in d.status()["workers"] if w["state"] == "serving"]


def fetch_through_relay(lab: Lab) -> bool:
    result = lab.run(lab.client, "curl", "-sS", "--max-time", "2", f"http://{WAN.peer4}:8080/who",
                     check=False)
    return result.stdout == "the real server\n"


@pytest.fixture
def web(lab: Lab):
    with open(os.path.join(lab.tmp, "who"), "w") as f:
        f.write("the real server\n")
    proc = lab.spawn(lab.server, sys.executable, "-m", "http.server", "--bind", "::",
                     "--directory", lab.tmp, "8080")
    wait_for_port(lab, lab.server, 8080)
    return proc


def test_a_killed_worker_is_replaced_within_2_seconds_and_a_crash_loop_backs_off(lab: Lab, web):
    d = Tproxyd(lab, config(lab))
    (first,) = worker_pids(d)
    os.kill(first, signal.SIGKILL)
    second = eventually(lambda: [p for p in worker_pids(d) if p != first], "a new worker")[0]
    eventually(lambda: fetch_through_relay(lab), "the new worker to serve")
    assert d.status()["counters"]["accepted"] >= 1  # the new worker carried it
    # Keep killing it: the restarts slow down and status says crash loop.
    pid, gaps = second, []
    for _ in range(4):
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        pid = eventually(lambda p=pid: [x for x in worker_pids(d) if x != p], "a restart",
                         timeout=10)[0]
        gaps.append(time.monotonic() - t)
    assert gaps[-1] >= 1.0 > gaps[0]  # 0.1 s, 0.2, 0.4, 0.8, 1.6: capped exponential backoff
    status = d.status()
    assert status["crash_loop"] == [0] and "signal 9" in status["last_exits"]["0"]
    assert "CRASH LOOP" in d.tproxy("status").stdout


RELOAD_LOAD = """
cd {tmp}
for i in $(seq 50); do
  curl -sS --limit-rate 4M http://{server}:8080/body -o /dev/stdout | sha256sum > sum.$i &
done
wait
cat sum.* | sort | uniq -c
"""


def test_reload_under_load_completes_every_transfer(lab: Lab):
    digest = serve_body(lab, 8 << 20)  # 50 transfers of 8 MiB at 4 MiB/s: about 2 s each
    d = Tproxyd(lab, config(lab))
    (old,) = worker_pids(d)
    load = lab.spawn(lab.client, "sh", "-c", RELOAD_LOAD.format(tmp=lab.tmp, server=WAN.peer4))
    eventually(lambda: d.status()["counters"].get("active", 0) >= 40, "transfers to start",
               timeout=10)
    d.save(config(lab, extra="[relay]\nidle_timeout = 600.0\n"))  # a relay setting: reload
    eventually(lambda: old not in worker_pids(d), "the relay to reload")
    os.kill(d.proc.pid, signal.SIGHUP)
    assert load.wait(timeout=120) == 0
    assert lab.log_of(load).split() == ["50", digest, "-"]
    assert d.status()["counters"].get("resets", 0) == 0


def snapshot(lab: Lab) -> dict:
    return {
        "rules4": lab.run(lab.gw, "ip", "-4", "rule").stdout,
        "rules6": lab.run(lab.gw, "ip", "-6", "rule").stdout,
        "routes": lab.run(lab.gw, "ip", "route", "show", "table", "all").stdout,
        "ruleset": lab.run(lab.gw, "nft", "list", "ruleset").stdout,
        "sysctls": lab.run(lab.gw, "sysctl", "net.ipv4.ip_forward",
                           "net.ipv6.conf.all.forwarding").stdout,
        "listening": lab.run(lab.gw, "ss", "-lntuH").stdout,
    }


def test_sigterm_with_on_exit_remove_leaves_the_gateway_as_it_was(lab: Lab):
    lab.sysctl(lab.gw, "net.ipv6.conf.all.forwarding", "0")
    before = snapshot(lab)
    d = Tproxyd(lab, config(lab))
    assert snapshot(lab) != before
    assert d.stop() == 0
    assert snapshot(lab) == before
    assert "removed what tproxyd owned" in lab.log_of(d.proc)


@pytest.mark.parametrize("when_down", ["reject", "pass"])
def test_with_the_relay_down_captured_traffic_is_refused_or_passed(lab: Lab, web, when_down):
    # extra lands in [daemon], after state_dir
    d = Tproxyd(lab, config(lab, extra=f'on_exit = "keep"\n[relay]\nwhen_down = "{when_down}"\n'))
    eventually(lambda: fetch_through_relay(lab), "the relay to serve")
    assert d.stop() == 0  # the rules stay, nobody listens on the relay port
    assert "table inet tproxyd" in lab.run(lab.gw, "nft", "list", "ruleset").stdout
    result = lab.run(lab.client, "curl", "-sS", "--max-time", "3", f"http://{WAN.peer4}:8080/who",
                     check=False)
    if when_down == "reject":
        assert result.returncode == 7, result  # "Couldn't connect": reset at once
        assert lab.log_of(web).count("GET /who") == 1  # only the request the relay carried
    else:
        assert result.stdout == "the real server\n"  # forwarded unproxied
        assert f"{LAN.peer4} - - " in lab.log_of(web)


def test_systemd_notifications(lab: Lab):
    path = os.path.join(lab.tmp, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        d = Tproxyd(lab, config(lab), env=env)
        assert b"READY=1" in sock.recv(4096)
        assert b"WATCHDOG=1" in sock.recv(4096)  # pinged at half the watchdog interval
        d.save(config(lab, extra="[relay]\nidle_timeout = 5.0\n"))
        seen = b""
        while b"READY=1" not in seen.split(b"RELOADING=1", 1)[-1]:
            seen += sock.recv(4096) + b"|"
        assert b"RELOADING=1" in seen
        d.stop()
        seen = b""
        while b"STOPPING=1" not in seen:
            seen += sock.recv(4096)
    finally:
        sock.close()


def test_status_shows_the_daemons_view(lab: Lab, web):
    d = Tproxyd(lab, config(lab))
    assert fetch_through_relay(lab)
    out = d.tproxy("status", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["in_sync"]
    daemon = report["daemon"]
    assert daemon["pid"] == d.proc.pid and daemon["config_error"] is None
    assert daemon["last_reconcile"]["result"] == "ok"
    assert [w["state"] for w in daemon["workers"]] == ["serving"]
    assert daemon["counters"]["accepted"] == 1
    assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"


def test_two_workers_share_the_listeners(lab: Lab, web):
    d = Tproxyd(lab, config(lab, extra="[relay]\nworkers = 2\n"))
    eventually(lambda: len(worker_pids(d)) == 2, "two workers")
    for _ in range(30):  # new connections spread over both (SO_REUSEPORT hashes them)
        assert fetch_through_relay(lab)
    per_worker = [read_stats_of(w) for w in d.status()["workers"]]
    assert sum(per_worker) == 30 and all(n > 0 for n in per_worker), per_worker


def read_stats_of(worker: dict) -> int:
    """Connections one worker accepted, from its own log-free counter socket."""
    from tproxyd.relay.loop import read_stats

    return read_stats(worker["stats"])["accepted"]


def exited(pid: int) -> bool:
    """pid has exited: gone, or a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_do_not_outlive_a_killed_daemon(lab: Lab):
    d = Tproxyd(lab, config(lab))
    (worker,) = worker_pids(d)
    os.kill(d.proc.pid, signal.SIGKILL)
    eventually(lambda: exited(worker), "the orphaned worker to exit", timeout=5)


def capturing(lab: Lab) -> bool:
    """The intercept's chain and set are in force (the table alone is not capture)."""
    out = lab.run(lab.gw, "nft", "list", "table", "inet", "tproxyd", check=False).stdout
    return "jump intercept_lan" in out and "@lan_dst4" in out and "tproxy ip to :12345" in out


def test_an_emptied_config_keeps_capture(lab: Lab, web):
    d = Tproxyd(lab, config(lab))
    assert capturing(lab) and fetch_through_relay(lab)
    with open(d.path, "w"):  # `: > tproxy.toml`
        pass
    status = eventually(lambda: (s := d.status()) and s["config_error"] and s, "the error in status",
                        timeout=10)
    assert "empty" in status["config_error"] and d.path in status["config_error"]
    time.sleep(1.0)  # past debounce and settle: had it been applied, capture would be gone
    assert capturing(lab)
    before = d.status()["counters"]["accepted"]
    assert fetch_through_relay(lab)
    eventually(lambda: d.status()["counters"]["accepted"] > before, "the relay to carry it")
    d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16"]'), "rename")
    eventually(lambda: "198.19.0.0/16" in dst4(lab), "the next good save to converge", timeout=5)
    assert d.status()["config_error"] is None
    # A valid config without [[intercept]] is taken, and the log says what it removed.
    d.save(f'[daemon]\nstate_dir = "{lab.tmp}/state"\n', "rename")
    eventually(lambda: not capturing(lab), "capture to be removed", timeout=5)
    assert f"WARNING {d.path} names no [[intercept]]: removing capture (lan" in lab.log_of(d.proc)


def two_part_saves(path: str, bodies: list[str], stop: threading.Event, saves: list[int]) -> None:
    """An editor saving in place in two writes: truncate and write the head (a valid config
    without [[intercept]]), 5 ms later the rest. Saves come in bursts longer than the daemon's
    longest debounce (a person hammering save, a script), with quiet gaps between bursts."""
    rng = random.Random(11)
    i = 0
    while not stop.is_set():
        burst_end = time.monotonic() + 1.5
        while time.monotonic() < burst_end and not stop.is_set():
            body = bodies[i % len(bodies)]
            cut = body.index("[[intercept]]")
            with open(path, "w") as f:
                f.write(body[:cut])
                f.flush()
                time.sleep(0.005)
                f.write(body[cut:])
            i += 1
            saves[0] = i
            time.sleep(rng.uniform(0, 0.02))
        stop.wait(0.6)


def rapid_saves_trial(lab: Lab, d: Tproxyd, seconds: float) -> tuple[int, int, int]:
    """(samples with capture missing, samples, saves) while two-part saves run."""
    bodies = [config(lab, destinations=f'["198.18.2.0/24", "198.19.{n}.0/24"]') for n in (1, 2)]
    stop, saves = threading.Event(), [0]
    writer = threading.Thread(target=two_part_saves, args=(d.path, bodies, stop, saves))
    writer.start()
    missing = samples = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples += 1
            missing += not capturing(lab)
    finally:
        stop.set()
        writer.join()
    return missing, samples, saves[0]


def test_two_part_in_place_saves_never_drop_capture(lab: Lab):
    d = Tproxyd(lab, config(lab))
    seconds = float(os.environ.get("TPROXYD_TRIAL_SECONDS", "4"))
    missing, samples, saves = rapid_saves_trial(lab, d, seconds)
    print(f"rapid saves for {seconds:g}s: {saves} saves, capture missing in {missing} of "
          f"{samples} samples")
    assert samples >= 20 and saves >= 5
    assert missing == 0, f"capture missing in {missing} of {samples} samples"
    last = "198.19.2.0/24" if saves % 2 == 0 else "198.19.1.0/24"  # the last body written
    eventually(lambda: last in dst4(lab), "the last save to converge", timeout=5)


def test_sighup_replaces_the_workers_with_an_unchanged_file(lab: Lab):
    digest = serve_body(lab, 12 << 20)
    d = Tproxyd(lab, config(lab, extra="[relay]\nworkers = 2\n"))
    old = eventually(lambda: len(p := worker_pids(d)) == 2 and p, "two workers")
    transfer = lab.spawn(lab.client, "sh", "-c", f"curl -sS --limit-rate 4M "
                                                 f"http://{WAN.peer4}:8080/body | sha256sum")
    eventually(lambda: d.status()["counters"].get("active", 0) >= 1, "the transfer to start",
               timeout=10)
    t = time.monotonic()
    os.kill(d.proc.pid, signal.SIGHUP)
    new = eventually(lambda: len(p := worker_pids(d)) == 2 and not set(p) & set(old) and p,
                     "new workers after SIGHUP", timeout=10)
    print(f"SIGHUP to {len(new)} new serving workers: {time.monotonic() - t:.2f}s")
    assert "SIGHUP: reloading" in lab.log_of(d.proc)
    assert transfer.wait(timeout=60) == 0  # the established connection survived the reload
    assert lab.log_of(transfer).split()[0] == digest


def test_totals_do_not_go_down_across_reloads(lab: Lab, web):
    d = Tproxyd(lab, config(lab))
    for _ in range(3):
        assert fetch_through_relay(lab)
    eventually(lambda: d.status()["counters"].get("accepted") == 3, "three accepted")
    for _ in range(2):  # the drained workers' counts stay in the totals
        (old,) = worker_pids(d)
        os.kill(d.proc.pid, signal.SIGHUP)
        eventually(lambda o=old: worker_pids(d) and o not in worker_pids(d), "a new worker")
        assert fetch_through_relay(lab)
    totals = eventually(lambda: (c := d.status()["counters"]).get("accepted") == 5 and c,
                        "five accepted over three generations of workers")
    assert totals["closed"] >= 4 and totals["bytes_down"] > 0
    state = os.path.join(lab.tmp, "state")

    def stats_sockets() -> set[str]:
        return {os.path.join(state, n) for n in os.listdir(state) if n.startswith("relay-")}

    live = {w["stats"] for w in d.status()["workers"]}
    eventually(lambda: stats_sockets() == live, "only the live worker's stats socket")
    assert d.stop() == 0
    assert stats_sockets() == set()


def timed_query(d: Tproxyd) -> tuple[float, dict]:
    t = time.monotonic()
    answer = query(d.socket, timeout=30)
    return time.monotonic() - t, answer


def test_a_stopped_worker_stalls_neither_status_nor_reconciles(lab: Lab, web):
    d = Tproxyd(lab, config(lab))
    (pid,) = worker_pids(d)
    assert fetch_through_relay(lab)
    eventually(lambda: d.status()["counters"].get("accepted") == 1, "the fetch counted")
    os.kill(pid, signal.SIGSTOP)  # a worker that answers nothing (ours: started by the daemon)
    try:
        with ThreadPoolExecutor(6) as pool:  # six readers at once, as a dashboard and people
            answers = list(pool.map(lambda _: timed_query(d), range(6)))
        latencies = sorted(t for t, _ in answers)
        print(f"status with a stopped worker, 6 at once: {', '.join(f'{t:.2f}' for t in latencies)}s")
        assert latencies[-1] < 1.5, latencies  # before: one after another, 0.5 s each, in the loop
        assert all(a["counters"]["accepted"] == 1 for _, a in answers)  # the last report stands
        t = time.monotonic()
        out = d.tproxy("status")
        print(f"`tproxy status` with a stopped worker: {time.monotonic() - t:.2f}s")
        assert out.returncode == 0 and f"pid {pid}" in out.stdout, out
        # readers keep asking while a save converges: the loop is not held up by them
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                query(d.socket, timeout=30)

        readers = [threading.Thread(target=ask) for _ in range(4)]
        for r in readers:
            r.start()
        try:
            t = time.monotonic()
            d.save(config(lab, destinations='["198.18.2.0/24", "198.19.0.0/16"]'), "rename")
            eventually(lambda: "198.19.0.0/16" in dst4(lab), "a save to converge", timeout=3)
            print(f"a save converged in {time.monotonic() - t:.2f}s with 4 readers asking")
        finally:
            stop.set()
            for r in readers:
                r.join()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert fetch_through_relay(lab)


def test_workers_get_the_last_good_config_without_a_file_in_state_dir(lab: Lab, web):
    d = Tproxyd(lab, config(lab, extra="[relay]\nidle_timeout = 77.0\n"))
    d.save("[relay\n")  # broken on disk: a restarted worker must still get the last good one
    eventually(lambda: "TOML syntax" in (d.status()["config_error"] or ""), "the syntax error")
    (first,) = worker_pids(d)
    os.kill(first, signal.SIGKILL)
    (second,) = eventually(lambda: [p for p in worker_pids(d) if p != first], "a new worker")
    with open(f"/proc/{second}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"--config-fd" in argv
    eventually(lambda: fetch_through_relay(lab), "the new worker to serve")
    assert "running.toml" not in os.listdir(os.path.join(lab.tmp, "state"))


def test_a_reload_right_after_traffic_loses_no_count(lab: Lab, web):
    """A drained worker's last counts reach the totals even when it ends between two of the
    daemon's periodic reads (it reports them as it exits)."""
    d = Tproxyd(lab, config(lab))
    for _ in range(3):
        (old,) = worker_pids(d)
        assert fetch_through_relay(lab)
        os.kill(d.proc.pid, signal.SIGHUP)  # at once: no periodic read in between, mostly
        # no status request (which asks every worker) until the old worker is gone
        eventually(lambda o=old: exited(o), "the old worker to drain and exit", timeout=10)
    eventually(lambda: d.status()["counters"].get("accepted") == 3, "three accepted", timeout=5)


def test_an_unreadable_config_keeps_capture(lab: Lab):
    body = config(lab)
    d = Tproxyd(lab, body)
    os.unlink(d.path)
    status = eventually(lambda: (s := d.status()) and s["config_error"] and s, "the error in status")
    assert f"{d.path}: cannot read: No such file or directory" in status["config_error"]
    os.kill(d.proc.pid, signal.SIGHUP)  # a reload of a missing file changes nothing either
    time.sleep(1.0)
    assert capturing(lab)
    assert lab.log_of(d.proc).count("cannot read") == 1  # said once, not on every reconcile
    d.save(body, "rename")
    eventually(lambda: d.status()["config_error"] is None, "the restored file to clear the error")
    assert capturing(lab)


def test_status_text_follows_the_daemon_and_no_intercept_means_no_listener(lab: Lab, web):
    """Issue 15: `systemctl status` showed "config error" after the file was fixed, and the
    shipped config (no [[intercept]]) still opened the relay's port."""
    path = os.path.join(lab.tmp, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)

    def status_until(prefix: str) -> str:
        while True:
            for line in sock.recv(4096).decode().splitlines():
                if line.startswith("STATUS=") and line[7:].startswith(prefix):
                    return line[7:]

    def listening() -> bool:
        return bool(lab.run(lab.gw, "ss", "-ltnH", "sport = :12345", check=False).stdout.strip())

    try:
        d = Tproxyd(lab, config(lab), env={**os.environ, "NOTIFY_SOCKET": path})
        assert status_until("converged") == "converged: intercepting lan; 1 relay worker(s)"
        d.save(config(lab, extra="[relay]\nport = 70000\n"))
        assert "relay.port" in status_until("config error")
        d.save(config(lab))
        status_until("converged")  # the fixed file clears the error
        d.save(f'[daemon]\nstate_dir = "{lab.tmp}/state"\n')
        status_until("nothing to intercept")
        eventually(lambda: not listening(), "the relay's port to close", timeout=15)
        eventually(lambda: not d.status()["workers"], "the workers to end", timeout=15)
        assert lab.run(lab.gw, "nft", "list", "tables").stdout.strip() == ""
        d.save(config(lab))
        status_until("converged")
        wait_for_port(lab, lab.gw, 12345)
        assert fetch_through_relay(lab)
        d.stop()
    finally:
        sock.close()
