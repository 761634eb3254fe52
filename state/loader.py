"""Load and validate tproxy.toml. Raises only ConfigError, naming the file and key path of each problem."""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import sys
from typing import Any, Callable, Dict, List, Tuple

from .config import (
    REDIRECT,
    TPROXY,
    Cidr,
    Config,
    Daemon,
    Intercept,
    Marks,
    Nftables,
    PortRange,
    RelayConfig,
    Routing,
)
from .errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older interpreters only
    import tomli as tomllib

RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
# rtnetlink protocols the kernel and iproute2 use themselves (unspec, redirect, kernel, boot, static)
RESERVED_PROTOCOLS = range(0, 5)
MAX_U32 = 0xFFFFFFFF
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
NFT_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
# words of nft's own language: a table named like one cannot be typed back in `nft list table ...`
NFT_KEYWORDS = {"tproxy", "socket", "meta", "fib", "ct", "table", "chain", "set", "map", "rule",
                "element", "inet", "ip", "ip6", "arp", "bridge", "netdev", "counter", "log"}
IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)$")


class _Collector:
    """Gathers problems so one run reports all of them, not just the first."""

    def __init__(self) -> None:
        self.problems: List[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(message=message, path=path))


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a float",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _check_keys(table: Dict[str, Any], allowed: Tuple[str, ...], path: str, out: _Collector) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else f"; known keys: {', '.join(allowed)}"
            out.add(f"{path}.{key}" if path else key, f"unknown key '{key}'{suggestion}")


def _int(value: Any, path: str, out: _Collector, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        out.add(path, f"must be an integer, not {_type_name(value)}")
        return None
    if not lo <= value <= hi:
        out.add(path, f"{value} is out of range {lo}..{hi}")
        return None
    return value


def _bool(value: Any, path: str, out: _Collector) -> bool | None:
    if not isinstance(value, bool):
        out.add(path, f"must be true or false, not {_type_name(value)}")
        return None
    return value


def _str(value: Any, path: str, out: _Collector) -> str | None:
    if not isinstance(value, str):
        out.add(path, f"must be a string, not {_type_name(value)}")
        return None
    return value


def _list(value: Any, path: str, out: _Collector) -> List[Any] | None:
    if not isinstance(value, list):
        out.add(path, f"must be an array, not {_type_name(value)}")
        return None
    return value


def _section(doc: Dict[str, Any], name: str, out: _Collector) -> Dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        out.add(name, f"must be a table ([{name}]), not {_type_name(value)}")
        return {}
    return value


def _fields(section: Dict[str, Any], path: str, out: _Collector,
            spec: Dict[str, Callable[[Any, str], Any]], defaults: Any) -> Dict[str, Any]:
    """Validate the keys of one flat section; a key that fails keeps its default."""
    _check_keys(section, tuple(spec), path, out)
    result = {}
    for key, check in spec.items():
        if key in section:
            value = check(section[key], f"{path}.{key}")
            result[key] = getattr(defaults, key) if value is None else value
    return result


def _fast_cidr(text: str) -> Cidr | None:
    """The common spelling ('198.18.0.0/15', '2001:db8::/32', canonical, host bits clear) read
    with inet_pton; anything else (None) takes ipaddress's slower path and its error messages."""
    addr, slash, length = text.partition("/")
    family, bits, version = ((socket.AF_INET6, 128, 6) if ":" in addr else (socket.AF_INET, 32, 4))
    try:
        packed = socket.inet_pton(family, addr)
    except OSError:
        return None
    if socket.inet_ntop(family, packed) != addr:
        return None
    if slash:
        if not (length.isascii() and length.isdigit()) or length != str(int(length)):
            return None
        prefixlen = int(length)
        if prefixlen > bits:
            return None
    else:
        prefixlen = bits
    address = int.from_bytes(packed, "big")
    if address & ((1 << (bits - prefixlen)) - 1):
        return None
    return Cidr(version, address, prefixlen)


def _network(value: Any, path: str, out: _Collector) -> Cidr | None:
    if isinstance(value, str) and (fast := _fast_cidr(value)) is not None:
        return fast
    text = _str(value, path, out)
    if text is None:
        return None
    if "%" in text:  # Python accepts "fe80::1%eth0"; nftables sets cannot hold a zone
        out.add(path, f"'{text}' is not an IPv4 or IPv6 address or CIDR (no %zone allowed)")
        return None
    try:
        return Cidr.of(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            detail = "" if text in str(exc) else f" ({exc})"
            out.add(path, f"'{text}' is not an IPv4 or IPv6 address or CIDR{detail}")
        else:
            out.add(path, f"'{text}' has host bits set; did you mean '{loose}'?")
        return None


def _networks(value: Any, path: str, out: _Collector) -> Tuple[Cidr, ...] | None:
    items = _list(value, path, out)
    if items is None:
        return None
    nets = []
    for i, item in enumerate(items):
        net = _network(item, f"{path}[{i}]", out)
        if net is not None:
            nets.append(net)
    return tuple(nets)


def _port(text: str, path: str, out: _Collector) -> int | None:
    if not text.isdigit():
        out.add(path, f"'{text}' is not a port number")
        return None
    return _int(int(text), path, out, 1, 65535)


def _ports(value: Any, path: str, out: _Collector) -> Tuple[PortRange, ...] | None:
    items = _list(value, path, out)
    if items is None:
        return None
    ranges: List[PortRange] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if isinstance(item, int) and not isinstance(item, bool):
            port = _int(item, where, out, 1, 65535)
            if port is not None:
                ranges.append((port, port))
        elif isinstance(item, str):
            lo_text, sep, hi_text = item.strip().partition("-")
            lo = _port(lo_text.strip(), where, out)
            hi = _port(hi_text.strip(), where, out) if sep else lo
            if lo is not None and hi is not None:
                if lo > hi:
                    out.add(where, f"range '{item}' is backwards (first port above last)")
                else:
                    ranges.append((lo, hi))
        else:
            out.add(where, f"must be a port (443) or a range (\"8000-8999\"), not {_type_name(item)}")
    return tuple(ranges)


def _interfaces(value: Any, path: str, out: _Collector) -> Tuple[str, ...] | None:
    items = _list(value, path, out)
    if items is None:
        return None
    names = []
    for i, item in enumerate(items):
        name = _str(item, f"{path}[{i}]", out)
        if name is None:
            continue
        if not IFNAME_RE.match(name) or name in (".", ".."):
            out.add(f"{path}[{i}]", f"'{name}' is not a valid interface name "
                                    "(1-15 characters, no whitespace, '/' or ':')")
        elif name in names:
            out.add(f"{path}[{i}]", f"interface '{name}' is listed twice")
        else:
            names.append(name)
    if not items:
        out.add(path, "must name at least one interface (capturing on every interface is not supported)")
    return tuple(names)


def _protocols(value: Any, path: str, out: _Collector) -> Tuple[str, ...] | None:
    items = _list(value, path, out)
    if items is None:
        return None
    protos: List[str] = []
    for i, item in enumerate(items):
        if item not in ("tcp", "udp"):
            out.add(f"{path}[{i}]", f"{item!r} is not a protocol; use \"tcp\" or \"udp\"")
        elif item in protos:
            out.add(f"{path}[{i}]", f"protocol '{item}' is listed twice")
        else:
            protos.append(item)
    if not items:
        out.add(path, "must name at least one protocol (\"tcp\", \"udp\")")
    return tuple(protos)


INTERCEPT_KEYS = ("name", "interfaces", "protocols", "destinations", "ports", "exclude")


def _intercept(raw: Any, index: int, out: _Collector, mode: str) -> Intercept | None:
    path = f"intercept[{index}]"
    if not isinstance(raw, dict):
        out.add(path, f"must be a table ([[intercept]]), not {_type_name(raw)}")
        return None
    _check_keys(raw, INTERCEPT_KEYS, path, out)
    before = len(out.problems)
    name = raw.get("name", f"intercept{index}")
    if _str(name, f"{path}.name", out) is not None and not NAME_RE.match(name):
        out.add(f"{path}.name", f"'{name}' must be 1-32 lowercase letters, digits or '_', "
                                "starting with a letter (it names nft sets)")
    if "interfaces" not in raw:
        out.add(f"{path}.interfaces", "is required: the ingress interfaces whose traffic is captured")
        interfaces: Tuple[str, ...] | None = ()
    else:
        interfaces = _interfaces(raw["interfaces"], f"{path}.interfaces", out)
    defaults = Intercept(name="", interfaces=())
    # REDIRECT rewrites the destination and only TCP can ask for it back (SO_ORIGINAL_DST).
    default_protocols = ["tcp"] if mode == REDIRECT else list(defaults.protocols)
    protocols = _protocols(raw.get("protocols", default_protocols), f"{path}.protocols", out)
    if mode == REDIRECT and protocols and "udp" in protocols:
        out.add(f"{path}.protocols", "relay.mode = \"redirect\" carries TCP only; "
                                     "remove \"udp\" or use mode = \"tproxy\"")
    dests = (_networks(raw["destinations"], f"{path}.destinations", out)
             if "destinations" in raw else defaults.destinations)
    ports = _ports(raw.get("ports", []), f"{path}.ports", out)
    exclude = _networks(raw.get("exclude", []), f"{path}.exclude", out)
    if dests is not None and "destinations" in raw and not raw["destinations"]:
        out.add(f"{path}.destinations", "must list at least one CIDR (\"0.0.0.0/0\", \"::/0\" for all)")
    if len(out.problems) != before:
        return None
    return Intercept(name=name, interfaces=interfaces or (), protocols=protocols or (),
                     destinations=dests or (), ports=ports or (), exclude=exclude or ())


TOP_KEYS = ("relay", "marks", "routing", "nftables", "daemon", "intercept")


def parse_document(doc: Dict[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document into a Config, or raise ConfigError listing every problem."""
    out = _Collector()
    _check_keys(doc, TOP_KEYS, "", out)

    relay = RelayConfig(**_fields(_section(doc, "relay", out), "relay", out, {
        "port": lambda v, p: _int(v, p, out, 1, 65535),
        "mode": lambda v, p: _choice(v, p, out, (TPROXY, REDIRECT)),
        "spoof_source": lambda v, p: _bool(v, p, out),
        "max_connections": lambda v, p: _int(v, p, out, 1, 1_000_000),
        "connect_timeout": lambda v, p: _seconds(v, p, out, 0.001, 3600),
        "idle_timeout": lambda v, p: _seconds(v, p, out, 0, 30 * 86400),
        "udp_idle_timeout": lambda v, p: _seconds(v, p, out, 0.001, 86400),
        "max_udp_sessions": lambda v, p: _int(v, p, out, 1, 1_000_000),
        "workers": lambda v, p: _workers(v, p, out),
        "drain_timeout": lambda v, p: _seconds(v, p, out, 0, 86400),
        "when_down": lambda v, p: _choice(v, p, out, ("reject", "pass")),
        "max_pipe_memory": lambda v, p: _size(v, p, out, 0, 1 << 40),
        "max_connections_per_client": lambda v, p: _int(v, p, out, 1, 1_000_000),
        "max_udp_sessions_per_client": lambda v, p: _int(v, p, out, 1, 1_000_000),
    }, RelayConfig()))

    marks = Marks(**_fields(_section(doc, "marks", out), "marks", out, {
        "intercept": lambda v, p: _int(v, p, out, 1, MAX_U32),
        "relay": lambda v, p: _int(v, p, out, 1, MAX_U32),
    }, Marks()))
    if marks.intercept & marks.relay:
        out.add("marks", f"intercept mark {marks.intercept:#x} and relay mark {marks.relay:#x} share "
                         f"bits {marks.intercept & marks.relay:#x}; the relay's packets would be "
                         "captured again. Use disjoint bits (0x1 and 0x2)")

    routing = Routing(**_fields(_section(doc, "routing", out), "routing", out, {
        "table": lambda v, p: _table(v, p, out),
        "priority": lambda v, p: _int(v, p, out, 1, 32765),
        "protocol": lambda v, p: _protocol(v, p, out),
        "forwarding": lambda v, p: _bool(v, p, out),
    }, Routing()))

    nft = Nftables(**_fields(_section(doc, "nftables", out), "nftables", out, {
        "table": lambda v, p: _nft_table(v, p, out),
        "priority": lambda v, p: _int(v, p, out, -400, 400),
    }, Nftables()))

    daemon = Daemon(**_fields(_section(doc, "daemon", out), "daemon", out, {
        "state_dir": lambda v, p: _abs_path(v, p, out),
        "socket": lambda v, p: _abs_path(v, p, out),
        "resync_interval": lambda v, p: _seconds(v, p, out, 0.1, 86400),
        "on_exit": lambda v, p: _choice(v, p, out, ("remove", "keep")),
    }, Daemon()))

    intercepts: List[Intercept] = []
    raw_list = doc.get("intercept", [])
    if not isinstance(raw_list, list):
        out.add("intercept", "must be an array of tables ([[intercept]])")
        raw_list = []
    seen: Dict[str, int] = {}
    for i, raw in enumerate(raw_list):
        entry = _intercept(raw, i, out, relay.mode)
        if entry is None:
            continue
        if entry.name in seen:
            out.add(f"intercept[{i}].name", f"'{entry.name}' is already the name of "
                                            f"intercept[{seen[entry.name]}]; names must be unique")
            continue
        seen[entry.name] = i
        intercepts.append(entry)

    if out.problems:
        raise ConfigError(source, out.problems)
    return Config(relay=relay, marks=marks, routing=routing, nftables=nft, daemon=daemon,
                  intercepts=tuple(intercepts), source=source)


def _workers(value: Any, path: str, out: _Collector) -> int | None:
    if value == "auto":
        return 0  # one per CPU: the supervisor counts them (no syscalls in this package)
    if isinstance(value, str):
        out.add(path, f"{value!r} is neither a number of workers nor \"auto\"")
        return None
    return _int(value, path, out, 1, 256)


SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _size(value: Any, path: str, out: _Collector, lo: int, hi: int) -> int | None:
    """Bytes: an integer, or a string with a binary unit ("256MiB", "64KiB", "1GiB")."""
    if isinstance(value, str) and (match := SIZE_RE.match(value)):
        value = int(match.group(1)) * SIZE_UNITS[match.group(2)]
    elif isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value) if isinstance(value, (str, float, bool)) else _type_name(value)
        out.add(path, f"{shown} is not a size; use bytes (268435456) or a number with B, KiB, "
                      "MiB or GiB (\"256MiB\")")
        return None
    return _int(value, path, out, lo, hi)


def _choice(value: Any, path: str, out: _Collector, choices: tuple[str, ...]) -> str | None:
    if value not in choices:
        out.add(path, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return None
    return value


def _seconds(value: Any, path: str, out: _Collector, lo: float, hi: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        out.add(path, f"must be a number of seconds, not {_type_name(value)}")
        return None
    if not lo <= value <= hi:
        out.add(path, f"{value} is out of range {lo:g}..{hi:g} seconds")
        return None
    return float(value)


def _table(value: Any, path: str, out: _Collector) -> int | None:
    table = _int(value, path, out, 1, MAX_U32)
    if table is not None and table in RESERVED_TABLES:
        out.add(path, f"table {table} is the kernel's '{RESERVED_TABLES[table]}' table; "
                      "pick a free number such as 100")
        return None
    return table


def _protocol(value: Any, path: str, out: _Collector) -> int | None:
    proto = _int(value, path, out, 0, 255)
    if proto is not None and proto in RESERVED_PROTOCOLS:
        out.add(path, f"protocol {proto} is reserved by the kernel (0-4); pick one such as 201")
        return None
    return proto


def _nft_table(value: Any, path: str, out: _Collector) -> str | None:
    name = _str(value, path, out)
    if name is None:
        return None
    if not NFT_TABLE_RE.match(name):
        out.add(path, f"'{name}' must be a letter then letters, digits or '_' (at most 64)")
        return None
    if name.lower() in NFT_KEYWORDS:
        out.add(path, f"'{name}' is a keyword of nft's language; `nft list table inet {name}` "
                      "would not parse. Pick another name, such as 'tproxyd'")
        return None
    return name


def _abs_path(value: Any, path: str, out: _Collector) -> str | None:
    text = _str(value, path, out)
    if text is not None and not text.startswith("/"):
        out.add(path, f"'{text}' must be an absolute path")
        return None
    return text


def loads(text: str, source: str = "<config>") -> Config:
    """Parse TOML text and validate it. Raises ConfigError (with line and column for syntax)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = TOML_POS_RE.search(message)
        if match:
            line, col = int(match.group(1)), int(match.group(2))
            message = message[: match.start()].rstrip()
        else:  # "(at end of document)"
            line = text.count("\n") + 1
            col = len(text) - (text.rfind("\n") + 1) + 1
            message = message.replace("(at end of document)", "at end of file").strip()
        raise ConfigError(source, [Problem(message=f"TOML syntax: {message}", line=line,
                                           column=col)]) from None
    return parse_document(doc, source)


def read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, [Problem(message=f"cannot read: {exc.strerror or exc}")]) from None


def from_bytes(raw: bytes, path: str) -> Config:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, [Problem(message="not valid UTF-8", line=line)]) from None
    return loads(text, path)


def load(path: str) -> Config:
    """Read and validate the config file at path."""
    return from_bytes(read(path), path)
