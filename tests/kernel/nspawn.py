"""A clean Debian 12 root (debootstrap minbase + systemd), cached as a tarball keyed by date, and
booted with systemd-nspawn on a private network: where the package is installed, run, upgraded
and removed as an admin would, without touching this host's services or network namespace."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

CACHE = Path(os.environ.get("TPROXYD_CI_CACHE", "/var/cache/tproxyd-ci"))
MIRROR = os.environ.get("TPROXYD_CI_MIRROR", "http://deb.debian.org/debian")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive"}
# Nothing in the root should wait for a console or a network that a test container lacks.
MASKED = ("getty@tty1.service", "console-getty.service", "systemd-networkd-wait-online.service",
          "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer")


def unavailable() -> str:
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if not shutil.which(t)]
    if missing:
        return f"needs {', '.join(missing)} (sh .ci/setup installs debootstrap, systemd-container)"
    return ""


def bookworm_tarball() -> Path:
    """Today's root, made once a day (a day old at most: security updates) and kept in CACHE;
    older ones are removed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"bookworm-minbase-systemd-{datetime.date.today().isoformat()}.tar"
    if tar.exists():
        return tar
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix="debootstrap-"))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus",
                        "bookworm", str(work / "root"), MIRROR], check=True, capture_output=True,
                       timeout=1200)
        subprocess.run(["chroot", str(work / "root"), "systemctl", "mask", *MASKED], check=True,
                       capture_output=True, env=ENV)
        subprocess.run(["tar", "-C", str(work / "root"), "--numeric-owner", "-cf",
                        f"{tar}.part", "."], check=True, timeout=600)
        os.replace(f"{tar}.part", tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in CACHE.glob("bookworm-minbase-systemd-*.tar"):
        if old != tar:
            old.unlink(missing_ok=True)
    return tar


class Root:
    """An unpacked copy of the cached root under a directory of the test's own."""

    def __init__(self, where: Path):
        self.path = where / "root"
        self.path.mkdir()
        subprocess.run(["tar", "-C", str(self.path), "--numeric-owner", "-xf",
                        str(bookworm_tarball())], check=True, timeout=600)
        shutil.copy("/etc/resolv.conf", self.path / "etc/resolv.conf")

    def chroot(self, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """For apt's downloads only (the host's network, nothing started: no systemd runs)."""
        return subprocess.run(["chroot", str(self.path), *cmd], text=True, capture_output=True,
                              env=ENV, check=check, timeout=timeout, stdin=subprocess.DEVNULL)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Booted:
    """The root booted under systemd-nspawn (--private-network): commands run in it with
    nsenter into its init's namespaces."""

    def __init__(self, root: Root, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(root.path), "--boot", "--private-network",
             "--register=no", "--keep-unit"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.init = 0

    def wait_ready(self) -> None:
        self.init = self._find_init()
        # early on, systemctl may not reach the manager yet (its private socket is not bound):
        # ask again until boot is done, whatever it answers meanwhile
        deadline = time.monotonic() + 180
        while True:
            out = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=180)
            if out.stdout.strip() in ("running", "degraded"):
                return
            assert time.monotonic() < deadline, (out.stdout, out.stderr, log_text(self.log))
            time.sleep(0.5)

    def _find_init(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited: {log_text(self.log)}"
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
                for pid in children.split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.2)
        raise AssertionError("the container's systemd never started")

    def run(self, *cmd: str, check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(["nsenter", "-t", str(self.init), "-a", "--", *cmd], text=True,
                             capture_output=True, env=ENV, timeout=timeout, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("sh", "-ec", script, check=check, timeout=timeout)

    def journal(self, unit: str = "tproxyd") -> str:
        which = ["-u", unit] if unit else []
        return self.run("journalctl", *which, "--no-pager", "-n", "60", check=False).stdout

    def poweroff(self) -> None:
        """nspawn turns SIGTERM into an orderly shutdown of the container; our own pid only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


def log_text(f) -> str:
    f.flush()
    return Path(f.name).read_text()[-3000:]


@contextlib.contextmanager
def booted(root: Root, log: Path) -> Iterator[Booted]:
    box = Booted(root, log)
    try:
        box.wait_ready()
        yield box
    finally:
        box.poweroff()
