"""Our nftables table through libnftables' JSON API: one transaction per change, return codes checked.

The binding's json_cmd never raises on its own: every call here checks rc and turns it into
KernelError. `writes` counts committed transactions.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Dict, List, Tuple

from tproxyd.state.nft import FAMILY, ListingError, NftTable, table_from_listing

from .errors import KernelError

NETLINK_NETFILTER = 12
NFT_MSG_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN
NLM_F_REQUEST = 1
NFTA_GEN_ID = 1


def _binding():
    try:
        import nftables
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise KernelError("load the nftables Python binding",
                          "install Debian's python3-nftables (or pip-nftables with libnftables1)"
                          ) from exc
    return nftables


class Nft:
    def __init__(self) -> None:
        self.nft = _binding().Nftables()
        self.nft.set_json_output(True)
        self.nft.set_handle_output(True)
        self.writes = 0

    def _cmd(self, what: str, commands: List[Dict[str, Any]], dry_run: bool = False) -> Any:
        self.nft.set_dry_run(dry_run)
        try:
            rc, out, err = self.nft.json_cmd({"nftables": commands})
        finally:
            self.nft.set_dry_run(False)
        if rc != 0:
            raise KernelError(what, _first_error(err))
        return out

    def list_table(self, name: str) -> List[Dict[str, Any]] | None:
        """The objects of table inet NAME as JSON, or None when it does not exist."""
        self.nft.set_dry_run(False)
        rc, out, err = self.nft.json_cmd(
            {"nftables": [{"list": {"table": {"family": FAMILY, "name": name}}}]})
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise KernelError(f"list table {FAMILY} {name}", _first_error(err))
        return out.get("nftables", []) if isinstance(out, dict) else []

    def generation(self) -> int | None:
        """nftables' ruleset generation (NFT_MSG_GETGEN): every committed transaction, ours or
        anyone's, bumps it; dry runs and listings do not. None if it cannot be read."""
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
                s.settimeout(1.0)
                s.bind((0, 0))
                s.send(struct.pack("=IHHII", 20, NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0)
                       + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
                data = s.recv(65536)
        except OSError:
            return None
        offset = 20  # nlmsghdr + nfgenmsg
        while offset + 8 <= len(data):
            length, kind = struct.unpack_from("=HH", data, offset)
            if kind & 0x7FFF == NFTA_GEN_ID and length >= 8:
                return int(struct.unpack_from("!I", data, offset + 4)[0])
            if length < 4:
                break
            offset += (length + 3) & ~3
        return None

    def read_table(self, name: str, elements: bool = True) -> NftTable | None:
        """Our table as it is; without elements (terse: cheap at any size), sets come empty."""
        self.nft.set_terse_output(not elements)
        try:
            listing = self.list_table(name)
        finally:
            self.nft.set_terse_output(False)
        if listing is None:
            return None
        try:
            return table_from_listing(name, listing)
        except ListingError as exc:
            raise KernelError(f"read table {FAMILY} {name}", str(exc)) from exc

    def transaction(self, what: str, commands: List[Dict[str, Any]]) -> None:
        if not commands:
            return
        self.writes += 1
        self._cmd(what, commands)

    def check(self, commands: List[Dict[str, Any]]) -> str | None:
        """Dry-run a transaction in the kernel (validated, then aborted): None if it would load."""
        try:
            self._cmd("check", commands, dry_run=True)
        except KernelError as exc:
            return exc.detail
        return None

    def ruleset_terse(self) -> List[Dict[str, Any]]:
        """The whole ruleset without set elements (cheap, for preflight's look at others' tables)."""
        self.nft.set_terse_output(True)
        try:
            rc, out, err = self.nft.json_cmd({"nftables": [{"list": {"ruleset": None}}]})
        finally:
            self.nft.set_terse_output(False)
        if rc != 0:
            raise KernelError("list ruleset", _first_error(err))
        return out.get("nftables", []) if isinstance(out, dict) else []


def _first_error(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    errors = [ln.split("Error:", 1)[1].strip() for ln in lines if "Error:" in ln]
    return "; ".join(dict.fromkeys(errors)) or " ".join(lines) or "unknown error"


def mark_users(ruleset: List[Dict[str, Any]], own_table: str, marks: Tuple[int, ...]) -> List[str]:
    """Rules of other tables that compare or set a packet mark to one of our mark values."""
    found = []
    for item in ruleset:
        rule = item.get("rule")
        if not rule or (rule.get("family") == FAMILY and rule.get("table") == own_table):
            continue
        text = json.dumps(rule.get("expr", []))
        if '"key": "mark"' in text and any(_uses_value(rule.get("expr", []), m) for m in marks):
            found.append(f"{rule.get('family')} {rule.get('table')} chain {rule.get('chain')} "
                         f"(handle {rule.get('handle')})")
    return found


def _uses_value(node: Any, value: int) -> bool:
    if isinstance(node, dict):
        return any(_uses_value(v, value) for v in node.values())
    if isinstance(node, list):
        return any(_uses_value(v, value) for v in node)
    return isinstance(node, int) and not isinstance(node, bool) and node == value
