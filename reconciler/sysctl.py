"""sysctls through /proc/sys of the calling process's network namespace, and the memory of the
values tproxyd replaced, so that `down` can put them back."""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Dict

from tproxyd.state.plan import check_sysctl

from . import statefiles
from .errors import KernelError

PROC_SYS = "/proc/sys"
COMPONENT = re.compile(r"[A-Za-z0-9_-]+")
IFNAME = re.compile(r"[^\s/:]{1,15}")  # what Linux (dev_valid_name) and the config loader allow


def sysctl_path(key: str) -> str:
    """/proc/sys path of a dotted key; interface names may hold dots (eth0.100), so the
    per-interface part of net.ipv{4,6}.conf.IFNAME.LEAF is kept whole.

    ValueError for anything that is not such a key: keys reach here from a file in state_dir,
    and a path built from them is written as root."""
    parts = key.split(".")
    names = parts
    if len(parts) > 4 and parts[:1] == ["net"] and parts[2] in ("conf", "neigh"):
        ifname = ".".join(parts[3:-1])
        parts = [*parts[:3], ifname, parts[-1]]
        names = [*parts[:3], parts[-1]]
        if not IFNAME.fullmatch(ifname) or ifname in (".", ".."):
            raise ValueError(f"not a sysctl key: {key!r} (interface {ifname!r})")
    if len(parts) < 2 or not all(COMPONENT.fullmatch(p) for p in names):
        raise ValueError(f"not a sysctl key: {key!r}")
    path = os.path.normpath(os.path.join(PROC_SYS, *parts))
    if os.path.commonpath([PROC_SYS, path]) != PROC_SYS or path == PROC_SYS:
        raise ValueError(f"not a sysctl key: {key!r} (outside {PROC_SYS})")
    return path


def read(key: str) -> str | None:
    """The value, or None when the key does not exist here (module not loaded, no such interface)."""
    try:
        with open(sysctl_path(key)) as f:
            return f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise KernelError(f"read sysctl {key}", exc.strerror or str(exc)) from exc


def write(key: str, value: str) -> None:
    try:
        with open(sysctl_path(key), "w") as f:
            f.write(value)
    except OSError as exc:
        raise KernelError(f"sysctl {key} = {value}", exc.strerror or str(exc)) from exc


SO_NETNS_COOKIE = 71


def netns_id() -> str:
    """This network namespace: its inode (what `ip netns identify` compares) and, where the
    kernel has it (5.14+), its cookie, which is never reused while the inode number can be."""
    ino = os.stat("/proc/self/ns/net").st_ino
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return str(ino)
    return f"{ino}-{cookie}"


class NetnsRecord:
    """A small JSON record per network namespace in state_dir (on /run: gone at reboot, as the
    kernel state it describes), read and written through statefiles. `strict` records fail
    loudly; the others are caches."""

    def __init__(self, state_dir: str, kind: str, strict: bool = False):
        self.path = os.path.join(state_dir, f"{kind}-netns-{netns_id()}.json")
        self.strict = strict

    def load(self) -> dict:
        """The record; empty when absent or refused by statefiles (someone else's)."""
        try:
            raw = statefiles.read(self.path)
            data = json.loads(raw) if raw is not None else {}
        except (OSError, ValueError) as exc:
            if self.strict:
                raise KernelError(f"read {self.path}", str(exc)) from exc
            return {}  # a cache that cannot be read: verify everything again
        return data if isinstance(data, dict) else {}

    def save(self, data: dict) -> None:
        try:
            statefiles.write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError:
            if self.strict:
                raise

    def clear(self) -> None:
        statefiles.remove(self.path)


class SysctlMemory(NetnsRecord):
    """Values tproxyd replaced, for `down` to put back. Strict: a value that cannot be kept
    is not replaced."""

    def __init__(self, state_dir: str):
        super().__init__(state_dir, "sysctl", strict=True)

    def load(self) -> Dict[str, str]:
        """Only entries tproxyd could have made (a key it writes, an integer): `down` writes
        them back as root, so anything else in the file is dropped, and said."""
        saved = {}
        for key, value in super().load().items():
            try:
                check_sysctl(str(key), str(value))
            except ValueError as exc:
                statefiles.refuse(self.path, f"an entry: {exc}")
                continue
            saved[str(key)] = str(value)
        return saved
