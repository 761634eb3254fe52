"""Load and validate tproxy.toml. Raises only ConfigError, naming the file and key path of each problem."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import stat
import sys
from typing import Any, Callable, Dict, List, Set, Tuple

from .config import (
    REDIRECT,
    TPROXY,
    Cidr,
    Config,
    Daemon,
    Intercept,
    Log,
    Marks,
    Metrics,
    Nftables,
    PortRange,
    RelayConfig,
    Routing,
)
from .domains import DomainError
from .domains import entry as domain_entry
from .errors import ConfigError, Problem
from .upstreams import (
    DIRECT,
    HTTP,
    PROTOCOLS,
    REJECT,
    SOCKS5,
    UPSTREAM_TYPES,
    RouteRule,
    Secret,
    Upstream,
    ip_literal,
)

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
    except (OSError, ValueError):  # ValueError: a NUL in the text
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
    if not (text.isascii() and text.isdigit()):  # "²" is a digit to isdigit(), not to int()
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


TOP_KEYS = ("relay", "marks", "routing", "nftables", "daemon", "metrics", "log", "intercept",
            "upstream", "route")


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
        # past a few seconds a server-first protocol (SSH, SMTP) on a sniffed port stalls visibly
        "sniff_timeout": lambda v, p: _seconds(v, p, out, 0.01, 10),
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
        "settle": lambda v, p: _seconds(v, p, out, 0.01, 60),
    }, Daemon()))

    metrics = _metrics(_section(doc, "metrics", out), out, relay.port)
    log = Log(**_fields(_section(doc, "log", out), "log", out, {
        "access": lambda v, p: _access(v, p, out),
    }, Log()))

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

    upstreams, defined = _upstreams(doc, out, relay.port)
    routes = _routes(doc, out, upstreams, defined)

    if out.problems:
        raise ConfigError(source, out.problems)
    return Config(relay=relay, marks=marks, routing=routing, nftables=nft, daemon=daemon,
                  metrics=metrics, log=log, intercepts=tuple(intercepts), upstreams=tuple(upstreams.values()),
                  routes=tuple(routes), source=source)


def _metrics(section: Dict[str, Any], out: _Collector, relay_port: int) -> Metrics:
    """[metrics] listen = "127.0.0.1:9641" or "[::1]:9641": an address of this host, never a
    name (a name may resolve to several addresses, or to none when the daemon starts)."""
    _check_keys(section, ("listen",), "metrics", out)
    if "listen" not in section:
        return Metrics()
    path = "metrics.listen"
    hostport = _hostport(section["listen"], path, out, "listen")
    if hostport is None:
        return Metrics()
    host, port = hostport
    if ip_literal(host) is None:
        out.add(path, f"'{host}' is not an IP address: listen on an address of this host, "
                      "such as 127.0.0.1:9641 or [::1]:9641")
        return Metrics()
    if ipaddress.ip_address(host).is_multicast:
        out.add(path, f"{host} is a multicast address")
        return Metrics()
    if port == relay_port:
        out.add(path, f"port {port} is the relay's own port (relay.port)")
        return Metrics()
    return Metrics(host=str(ipaddress.ip_address(host)), port=port)


def _array_of_tables(doc: Dict[str, Any], key: str, out: _Collector) -> List[Any]:
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        out.add(key, f"must be an array of tables ([[{key}]])")
        return []
    return raw


# --- [[upstream]] ----------------------------------------------------------------------------------

UPSTREAM_KEYS = ("name", "type", "address", "username", "password_file", "udp", "connect_timeout",
                 "check_interval", "check_target", "send_domain")
UPSTREAM_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
PASSWORD_FILE_MAX = 4096  # bytes read: the first line is the password


def _hostport(value: Any, path: str, out: _Collector, what: str) -> Tuple[str, int] | None:
    """'198.51.100.7:1080', '[2001:db8::7]:1080' or 'proxy.example.net:1080' -> (host, port).
    A name is checked for its form only: it is resolved when used, not at load."""
    text = _str(value, path, out)
    if text is None:
        return None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or ip_literal(host) is None or ":" not in host or "%" in host:
            out.add(path, f"'{text}' is not [IPv6 address]:port")
            return None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            out.add(path, f"'{text}' has no port: write {what} as host:port, [IPv6]:port or name:port")
            return None
        if ":" in host:
            out.add(path, f"'{text}': write an IPv6 {what} in brackets, as [2001:db8::7]:1080")
            return None
        if ip_literal(host) is None and not _hostname(host):
            out.add(path, f"'{host}' is neither an IP address nor a DNS name")
            return None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        out.add(path, f"'{port_text}' is not a port (1..65535)")
        return None
    return host, int(port_text)


def _hostname(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # an all-digit last label is a mistyped IPv4 address, never a name (RFC 3696 2)
    return (len(name) <= 253 and all(HOST_LABEL_RE.match(label) for label in labels)
            and not labels[-1].isdigit())


def _password(value: Any, path: str, out: _Collector) -> Secret | None:
    """The first line of the file. Read now so that a missing or unsafe file is a config
    error like any other, not a failure at the first connection."""
    name = _abs_path(value, path, out)
    if name is None:
        return None
    try:
        # O_NONBLOCK: a FIFO put there must not hang the loader; fstat judges the file
        # actually opened, after any symlink (a Kubernetes secret is one)
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                out.add(path, f"'{name}' is not a regular file")
                return None
            if st.st_mode & 0o044:
                out.add(path, f"'{name}' is readable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {name}")
                return None
            raw = os.read(fd, PASSWORD_FILE_MAX)
        finally:
            os.close(fd)
    except OSError as exc:
        out.add(path, f"cannot read '{name}': {exc.strerror or exc}")
        return None
    first = raw.split(b"\n", 1)[0]
    first = first[:-1] if first.endswith(b"\r") else first
    if b"\n" not in raw and len(raw) == PASSWORD_FILE_MAX:
        out.add(path, f"'{name}': the first line is longer than {PASSWORD_FILE_MAX} bytes")
        return None
    try:
        password = first.decode("utf-8")
    except UnicodeDecodeError:
        out.add(path, f"'{name}': the password is not valid UTF-8")
        return None
    if not password:
        out.add(path, f"'{name}': the first line (the password) is empty")
        return None
    return Secret(password, name)


def _upstream(raw: Any, index: int, out: _Collector, relay_port: int) -> Upstream | None:
    path = f"upstream[{index}]"
    if not isinstance(raw, dict):
        out.add(path, f"must be a table ([[upstream]]), not {_type_name(raw)}")
        return None
    _check_keys(raw, UPSTREAM_KEYS, path, out)
    before = len(out.problems)
    defaults = Upstream(name="", type=SOCKS5, host="", port=0)
    name = _required(raw, "name", path, out, "the name routes use in `via`")
    if name is not None and _str(name, f"{path}.name", out) is not None:
        if not UPSTREAM_NAME_RE.match(name):
            out.add(f"{path}.name", f"'{name}' must be 1-64 lowercase letters, digits, '_' or '-'")
        elif name in (DIRECT, REJECT):
            out.add(f"{path}.name", f"'{name}' is reserved: `via = \"{name}\"` means {name}")
    kind = _required(raw, "type", path, out, '"socks5" or "http"')
    if kind is not None:
        kind = _choice(kind, f"{path}.type", out, UPSTREAM_TYPES)
    hostport = None
    if "address" not in raw:
        out.add(f"{path}.address", "is required: host:port, [IPv6]:port or name:port")
    else:
        hostport = _hostport(raw["address"], f"{path}.address", out, "address")
    if hostport is not None and ip_literal(hostport[0]) is not None:
        addr = ipaddress.ip_address(hostport[0])
        if addr.is_unspecified or addr.is_multicast:
            out.add(f"{path}.address", f"{addr} is not an address a proxy can listen on")
        elif addr.is_loopback and hostport[1] == relay_port:
            # the loop guard's sure case: the relay would connect to its own port
            out.add(f"{path}.address", f"{hostport[0]}:{hostport[1]} is the relay's own port "
                                       "(relay.port): every connection would loop back to it")
    username = raw.get("username", "")
    if _str(username, f"{path}.username", out) is not None and "username" in raw:
        if not username:
            out.add(f"{path}.username", "is empty; leave the key out for no authentication")
        elif kind == SOCKS5 and len(username.encode()) > 255:
            out.add(f"{path}.username", "is longer than 255 bytes (RFC 1929's limit)")
        elif kind == HTTP and ":" in username:
            out.add(f"{path}.username", "contains ':', which Basic authentication cannot carry")
    password = None
    if "password_file" in raw:
        if "username" not in raw:
            out.add(f"{path}.password_file", "is given without a username")
        password = _password(raw["password_file"], f"{path}.password_file", out)
        if password is not None and kind == SOCKS5 and len(password.reveal().encode()) > 255:
            out.add(f"{path}.password_file", "the password is longer than 255 bytes "
                                             "(RFC 1929's limit)")
    elif "username" in raw:
        out.add(f"{path}.password_file", "is required with a username: a file (mode 600) whose "
                                         "first line is the password; secrets never sit in the TOML")
    udp = _bool(raw.get("udp", False), f"{path}.udp", out)
    send_domain = _bool(raw.get("send_domain", True), f"{path}.send_domain", out)
    if udp and kind == HTTP:
        out.add(f"{path}.udp", "HTTP CONNECT carries TCP only; udp = true needs type = \"socks5\"")
    timeout = _seconds(raw.get("connect_timeout", defaults.connect_timeout),
                       f"{path}.connect_timeout", out, 0.001, 3600)
    interval = _seconds(raw.get("check_interval", defaults.check_interval),
                        f"{path}.check_interval", out, 0, 86400)
    target = ""
    if "check_target" in raw:
        if kind == SOCKS5:
            out.add(f"{path}.check_target", "is for http upstreams; a socks5 check is the "
                                             "greeting and authentication")
        elif _hostport(raw["check_target"], f"{path}.check_target", out, "check_target"):
            target = raw["check_target"]
    if len(out.problems) != before or name is None or kind is None or hostport is None:
        return None
    return Upstream(name=name, type=kind, host=hostport[0], port=hostport[1],
                    username=username, password=password, udp=bool(udp),
                    connect_timeout=timeout or defaults.connect_timeout,
                    check_interval=defaults.check_interval if interval is None else interval,
                    check_target=target, send_domain=send_domain is not False)


def _required(raw: Dict[str, Any], key: str, path: str, out: _Collector, what: str) -> Any:
    if key not in raw:
        out.add(f"{path}.{key}", f"is required: {what}")
        return None
    return raw[key]


def _upstreams(doc: Dict[str, Any], out: _Collector, relay_port: int
               ) -> Tuple[Dict[str, Upstream], Set[str]]:
    """The valid upstreams by name, and every name given (valid or not)."""
    found: Dict[str, Upstream] = {}
    index_of: Dict[str, int] = {}
    for i, raw in enumerate(_array_of_tables(doc, "upstream", out)):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in index_of:
            out.add(f"upstream[{i}].name", f"'{name}' is already the name of "
                                           f"upstream[{index_of[name]}]; names must be unique")
            continue
        if isinstance(name, str):
            index_of[name] = i
        entry = _upstream(raw, i, out, relay_port)
        if entry is not None:
            found[entry.name] = entry
    return found, set(index_of)


# --- [[route]] --------------------------------------------------------------------------------------

ROUTE_KEYS = ("name", "destinations", "ports", "sources", "protocols", "domains", "via")


def _via(value: Any, path: str, out: _Collector, upstreams: Dict[str, Upstream],
         defined: Set[str]) -> Tuple[str, ...] | None:
    items = [value] if isinstance(value, str) else _list(value, path, out)
    if items is None:
        return None
    if not items:
        out.add(path, 'must name at least one upstream, or be "direct" or "reject"')
        return None
    names: List[str] = []
    for i, item in enumerate(items):
        where = path if isinstance(value, str) else f"{path}[{i}]"
        if _str(item, where, out) is None:
            return None
        if item in (DIRECT, REJECT) and len(items) > 1:
            out.add(where, f'"{item}" stands alone (via = "{item}"), not in a list of upstreams')
            return None
        if item in names:
            out.add(where, f"upstream '{item}' is listed twice")
            return None
        if item not in (DIRECT, REJECT) and item not in upstreams:
            if item not in defined:
                known = ", ".join(sorted(upstreams)) or "none defined"
                hint = difflib.get_close_matches(item, list(upstreams), n=1)
                out.add(where, f"'{item}' is not an upstream"
                               + (f" (did you mean '{hint[0]}'?)" if hint else f"; upstreams: {known}"))
            return None
        names.append(item)
    return tuple(names)


def _nonempty(value: Tuple[Any, ...] | None, raw: Dict[str, Any], key: str, path: str,
              out: _Collector, what: str) -> None:
    if value is not None and not raw[key]:
        out.add(f"{path}.{key}", f"is empty, so the route would match nothing; leave the key out "
                                 f"to match every {what}")


def _route(raw: Any, index: int, out: _Collector, upstreams: Dict[str, Upstream],
           defined: Set[str]) -> RouteRule | None:
    path = f"route[{index}]"
    if not isinstance(raw, dict):
        out.add(path, f"must be a table ([[route]]), not {_type_name(raw)}")
        return None
    _check_keys(raw, ROUTE_KEYS, path, out)
    before = len(out.problems)
    name = raw.get("name", f"route{index}")
    if _str(name, f"{path}.name", out) is not None and not UPSTREAM_NAME_RE.match(name):
        out.add(f"{path}.name", f"'{name}' must be 1-64 lowercase letters, digits, '_' or '-'")
    dests = sources = None
    ports = None
    if "destinations" in raw:
        dests = _networks(raw["destinations"], f"{path}.destinations", out)
        _nonempty(dests, raw, "destinations", path, out, "destination")
    if "sources" in raw:
        sources = _networks(raw["sources"], f"{path}.sources", out)
        _nonempty(sources, raw, "sources", path, out, "client")
    if "ports" in raw:
        ports = _ports(raw["ports"], f"{path}.ports", out)
        _nonempty(ports, raw, "ports", path, out, "port")
    domains = None
    if "domains" in raw:
        domains = _domains(raw["domains"], f"{path}.domains", out)
        _nonempty(domains, raw, "domains", path, out, "name")
    via = None
    if "via" not in raw:
        out.add(f"{path}.via", 'is required: upstream names in failover order, "direct" or "reject"')
    else:
        via = _via(raw["via"], f"{path}.via", out, upstreams, defined)
    no_udp = [n for n in via or () if n in upstreams and not upstreams[n].udp]
    if "protocols" in raw:
        protocols = _protocols(raw["protocols"], f"{path}.protocols", out)
        if protocols and "udp" in protocols and no_udp:
            out.add(f"{path}.protocols", f"UDP cannot go through upstream '{no_udp[0]}' "
                                         "(it needs type = \"socks5\" and udp = true)")
    else:
        # UDP is routed only where every upstream can carry it; otherwise it goes on down the routes
        protocols = ("tcp",) if no_udp else PROTOCOLS
    if len(out.problems) != before or via is None or protocols is None:
        return None
    return RouteRule(name=name, via=via, destinations=dests, ports=ports, sources=sources,
                     protocols=protocols, domains=domains)


def _domains(value: Any, path: str, out: _Collector) -> Tuple[str, ...] | None:
    """Names as domains.entry() normalises them, each refusal with its index; duplicates after
    normalisation ("GitHub.com" and "github.com.") are kept once, silently: they mean the same."""
    items = _list(value, path, out)
    if items is None:
        return None
    found: Dict[str, None] = {}
    ok = True
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if _str(item, where, out) is None:
            ok = False
            continue
        try:
            found[domain_entry(item)] = None
        except DomainError as e:
            out.add(where, str(e))
            ok = False
    return tuple(found) if ok else None


def _routes(doc: Dict[str, Any], out: _Collector, upstreams: Dict[str, Upstream],
            defined: Set[str]) -> List[RouteRule]:
    """defined: upstream names given, valid or not; a route naming an upstream that failed
    its own checks gets no second error for it."""
    routes: List[RouteRule] = []
    seen: Dict[str, int] = {}
    for i, raw in enumerate(_array_of_tables(doc, "route", out)):
        entry = _route(raw, i, out, upstreams, defined)
        if entry is None:
            continue
        if entry.name in seen:
            out.add(f"route[{i}].name", f"'{entry.name}' is already the name of "
                                        f"route[{seen[entry.name]}]; names must be unique")
            continue
        seen[entry.name] = i
        routes.append(entry)
    return routes


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


def _access(value: Any, path: str, out: _Collector) -> str | None:
    """"off", "stderr" or an absolute path of a file (not a directory)."""
    text = _str(value, path, out)
    if text is None or text in ("off", "stderr"):
        return text
    if not text.startswith("/") or text.endswith("/"):
        out.add(path, f"'{text}' must be \"off\", \"stderr\" or the absolute path of a file")
        return None
    return text


def loads(text: str, source: str = "<config>") -> Config:
    """Parse TOML text and validate it. Raises ConfigError (with line and column for syntax)."""
    if not text.strip():  # what a save caught half-way looks like: never "capture nothing"
        raise ConfigError(source, [Problem(message="the file is empty; a config without "
                                                   "[[intercept]] needs at least a section "
                                                   "such as [relay]")])
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
