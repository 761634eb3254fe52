"""The config, validated and rendered, remembered by the digest of the file's bytes.

`tproxy apply` on an unchanged 100,000-CIDR file spent half a second parsing TOML and rendering
sets it had rendered before. An entry is keyed by the file's path and bytes and by tproxyd's own
code (the bytes of its modules), so an edit or an upgrade misses; a miss or an
unreadable entry just means loading the file again. `tproxy check` always reads the file.

Entries are pickles, so they are read and written through statefiles: only files that could not
have been written by anyone but us are read (directory and entry ours, writable by no one else).
Location: $TPROXYD_CACHE_DIR, else /run/tproxyd/cache (tmpfs: gone at reboot).
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

from tproxyd.state import config as config_module
from tproxyd.state.config import Cidr, Config, Intercept
from tproxyd.state.desired import DesiredState, render
from tproxyd.state.intervals import digest

from . import statefiles

DEFAULT_DIR = "/run/tproxyd/cache"
KEEP = 8  # entries; the oldest go first
FORMAT = b"tproxyd-desired-1"


@dataclass(frozen=True)
class Rendered:
    config: Config
    desired: DesiredState
    digests: Dict[str, str]  # set name -> intervals.digest of its contents


def cache_dir() -> str:
    return os.environ.get("TPROXYD_CACHE_DIR") or DEFAULT_DIR


def _code_fingerprint() -> bytes:
    """What the rendering depends on besides the file: our modules (their bytes: package builds
    clamp mtimes) and the Python reading them. About 25 small files, under a millisecond."""
    h = hashlib.sha256(FORMAT + sys.version.encode())
    for package in (os.path.dirname(config_module.__file__), os.path.dirname(__file__)):
        for entry in sorted(os.scandir(package), key=lambda e: e.name):
            if entry.name.endswith(".py"):
                with open(entry.path, "rb") as f:
                    h.update(entry.name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.digest()


def key_of(path: str, data: bytes) -> str:
    h = hashlib.sha256(_code_fingerprint())
    h.update(os.path.abspath(path).encode() + b"\0" + data)
    return h.hexdigest()


# Intercepts pickle their address lists as three flat lists: 100,000 Cidr tuples unpickle in
# 55 ms one by one, 25 ms this way.
def _intercept(name: str, interfaces: tuple, protocols: tuple, dests: tuple, ports: tuple,
               exclude: tuple) -> Intercept:
    return Intercept(name, interfaces, protocols, tuple(map(Cidr._make, zip(*dests))), ports,
                     tuple(map(Cidr._make, zip(*exclude))))


def _flat(cidrs: Tuple[Cidr, ...]) -> tuple:
    return ([c.version for c in cidrs], [c.address for c in cidrs], [c.prefixlen for c in cidrs])


def _reduce_intercept(i: Intercept) -> tuple:
    return (_intercept, (i.name, i.interfaces, i.protocols, _flat(i.destinations), i.ports,
                         _flat(i.exclude)))


def lookup(key: str) -> Rendered | None:
    found = statefiles.load_pickle(os.path.join(cache_dir(), key))
    return found if isinstance(found, Rendered) else None


def store(key: str, rendered: Rendered) -> None:
    """Best effort: a cache that cannot be written is a cache that misses."""
    directory = cache_dir()
    try:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = {**copyreg.dispatch_table, Intercept: _reduce_intercept}
        pickler.dump(rendered)
        statefiles.write(os.path.join(directory, key), buf.getvalue())
        entries = sorted((e for e in os.scandir(directory) if not e.name.startswith(".")),
                         key=lambda e: e.stat().st_mtime_ns)
        for old in entries[:-KEEP]:
            os.unlink(old.path)
    except OSError:
        pass


def load_rendered(path: str) -> Rendered:
    """The config at path with its desired state: from the cache, or loaded (raising
    ConfigError as load() does) and then remembered."""
    from tproxyd.state.loader import from_bytes, read

    data = read(path)
    key = key_of(path, data)
    found = lookup(key)
    if found is not None:
        return found
    config = from_bytes(data, path)
    desired = render(config)
    sets = desired.nft.sets if desired.nft else ()
    rendered = Rendered(config, desired, {s.name: digest(s.elements) for s in sets})
    store(key, rendered)
    return rendered
