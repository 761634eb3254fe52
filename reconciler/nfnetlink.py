"""nftables set elements and the ruleset generation over raw nfnetlink (stdlib socket + struct).

libnftables is the interface for everything else; at 100,000 ranges it spends seconds on set
contents (JSON, its own interval bookkeeping, a cache of the whole set before any delete), where
the kernel needs a fraction of that. So contents are read with one dump per set and changed with
one batch: atomic, and guarded by the generation the plan was made at (NFNL_BATCH_GENID: the
kernel refuses the batch with ERESTART if anyone committed since). The message layout is what
nft itself sends (`nft --debug=netlink`): boundary elements, see state.intervals.

The packing and parsing functions are pure (bytes in, bytes out) and tested without root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

from tproxyd.state.intervals import Element, Intervals, from_kernel, key_bytes, to_kernel

from .errors import KernelError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x4, 0x10
NLM_F_DUMP, NLM_F_CREATE, NLM_F_ACK_TLVS = 0x300, 0x400, 0x200
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG = 1

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_BATCH_GENID = 1
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETGEN = 12, 13, 14, 16
NFTA_GEN_ID = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_USERDATA = 1, 3, 6
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFPROTO_INET = 1
# nftnl userdata TLV: NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN (host order)
OPEN_UDATA = struct.pack("=BBI", 1, 4, 1)

MAX_NEST = 65535 - 64  # an attribute's length is 16 bits: split elements over messages
HEADER = struct.Struct("=IHHII")  # nlmsghdr
ATTR = struct.Struct("=HH")


class NetlinkError(KernelError):
    """The kernel's answer to a request (an errno, and its extended-ack text if any)."""

    def __init__(self, code: int, message: str = ""):
        self.code = code
        super().__init__("nfnetlink", f"{errno.errorcode.get(code, code)}: "
                                      f"{message or os.strerror(code)}")


class GenerationMoved(NetlinkError):
    """Someone committed an nftables change since the plan was made: plan again."""


def _pad(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    return ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (_pad(len(payload)) - len(payload))


def _strz(text: str) -> bytes:
    return text.encode() + b"\0"


def message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, res_id) + payload
    return HEADER.pack(16 + len(body), kind, flags, seq, 0) + body


def nft_type(msg: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | msg


# --- set elements: packing ----------------------------------------------------------------------

END_FLAGS = attr(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END))
OPEN_USERDATA = attr(NFTA_SET_ELEM_USERDATA, OPEN_UDATA)


def pack_elements(set_type: str, elements: Sequence[Element]) -> List[bytes]:
    """Each element as an NFTA_LIST_ELEM attribute. Every element of a set has the same layout
    but for its key, so the headers are made once per kind (start, end, open start)."""
    width = key_bytes(set_type)
    pad = b"\0" * (_pad(width) - width)
    value_len = 4 + width
    key_len = 4 + _pad(value_len)

    def head(extra: int) -> bytes:
        return (ATTR.pack(4 + key_len + extra, NFTA_LIST_ELEM | NLA_F_NESTED)
                + ATTR.pack(key_len, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
                + ATTR.pack(value_len, NFTA_DATA_VALUE))

    start, end, open_ = head(0), head(len(END_FLAGS)), head(len(OPEN_USERDATA))
    out = []
    for key, is_end, is_open in elements:
        k = key.to_bytes(width, "big") + pad
        if is_end:
            out.append(end + k + END_FLAGS)
        elif is_open:
            out.append(open_ + k + OPEN_USERDATA)
        else:
            out.append(start + k)
    return out


def element_messages(verb: int, table: str, set_name: str, packed: Sequence[bytes],
                     seq: int) -> Iterator[bytes]:
    """NEWSETELEM/DELSETELEM messages carrying the packed elements, each under 64 KiB."""
    head = attr(NFTA_SET_ELEM_LIST_TABLE, _strz(table)) + attr(NFTA_SET_ELEM_LIST_SET, _strz(set_name))
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == NFT_MSG_NEWSETELEM else 0)

    def one(chunk: List[bytes], seq: int) -> bytes:
        body = b"".join(chunk)
        nest = ATTR.pack(4 + len(body), NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED) + body
        return message(nft_type(verb), flags, seq, NFPROTO_INET, head + nest)

    chunk: List[bytes] = []
    size = 0
    for item in packed:
        if chunk and size + len(item) > MAX_NEST:
            yield one(chunk, seq)
            seq, chunk, size = seq + 1, [], 0
        chunk.append(item)
        size += len(item)
    if chunk:
        yield one(chunk, seq)


def batch(messages: Sequence[bytes], seq: int, genid: int | None) -> bytes:
    """BEGIN, the messages, END: one transaction. With genid, the kernel refuses the whole batch
    (ERESTART) unless the ruleset generation is still genid."""
    extra = attr(NFNL_BATCH_GENID, struct.pack("!I", genid)) if genid else b""
    res_id = socket.htons(NFNL_SUBSYS_NFTABLES)
    begin = message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, extra, res_id)
    end = message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", res_id)
    return begin + b"".join(messages) + end


# --- parsing ------------------------------------------------------------------------------------

def attrs(data: bytes | memoryview, start: int, stop: int) -> Iterator[Tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in data[start:stop]."""
    while start + 4 <= stop:
        length, kind = ATTR.unpack_from(data, start)
        if length < 4 or start + length > stop:
            raise NetlinkError(errno.EPROTO, "truncated netlink attribute")
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += _pad(length)


def messages(data: bytes | memoryview) -> Iterator[Tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, end) of the netlink messages in data."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
        if length < 16 or offset + length > len(data):
            raise NetlinkError(errno.EPROTO, "truncated netlink message")
        yield kind, flags, seq, offset + 16, offset + length
        offset += _pad(length)


def parse_error(data: bytes | memoryview, start: int, end: int, flags: int) -> Tuple[int, int, str]:
    """(errno, seq of the message answered, extended ack text) of an NLMSG_ERROR."""
    if end - start < 20:
        raise NetlinkError(errno.EPROTO, "short netlink error message")
    (code,) = struct.unpack_from("=i", data, start)
    seq = HEADER.unpack_from(data, start + 4)[3]
    text = ""
    if flags & NLM_F_ACK_TLVS:  # with NETLINK_CAP_ACK the request is not echoed: TLVs follow
        for kind, a, b in attrs(data, start + 4 + 16, end):
            if kind == NLMSGERR_ATTR_MSG:
                text = bytes(data[a:b]).rstrip(b"\0").decode(errors="replace")
    return -code, seq, text


def parse_set_elements(data: bytes | memoryview, start: int, end: int) -> List[Tuple[int, bool]]:
    """(key, is an end element) of each element in one NEWSETELEM message's payload."""
    found: List[Tuple[int, bool]] = []
    unpack, from_bytes = ATTR.unpack_from, int.from_bytes
    for kind, a, b in attrs(data, start + 4, end):  # after the nfgenmsg
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for _, ea, eb in attrs(data, a, b):
            # fast path, the kernel's own layout: KEY { VALUE } first, then maybe FLAGS
            klen, kkind = unpack(data, ea) if ea + 8 <= eb else (0, 0)
            vlen, vkind = unpack(data, ea + 4) if ea + 8 <= eb else (0, 0)
            if kkind & NLA_TYPE_MASK == NFTA_SET_ELEM_KEY and vkind == NFTA_DATA_VALUE \
                    and vlen >= 4 and 8 + _pad(vlen - 4) == klen and ea + klen <= eb:
                key = from_bytes(data[ea + 8:ea + 4 + vlen], "big")
                rest = ea + klen
                is_end = False
                if rest + 8 <= eb:
                    flen, fkind = unpack(data, rest)
                    if fkind == NFTA_SET_ELEM_FLAGS and flen == 8:
                        is_end = bool(data[rest + 7] & NFT_SET_ELEM_INTERVAL_END)
                    else:
                        is_end = _flags_of(data, rest, eb)
                found.append((key, is_end))
                continue
            key, is_end = None, False
            for ekind, x, y in attrs(data, ea, eb):
                if ekind == NFTA_SET_ELEM_KEY:
                    for vkind, p, q in attrs(data, x, y):
                        if vkind == NFTA_DATA_VALUE:
                            key = int.from_bytes(data[p:q], "big")
                elif ekind == NFTA_SET_ELEM_FLAGS:
                    is_end = _flags_of(data, ea, eb)
            if key is None:
                raise NetlinkError(errno.EPROTO, "set element without a key")
            found.append((key, is_end))
    return found


def _flags_of(data: bytes | memoryview, start: int, stop: int) -> bool:
    for kind, x, y in attrs(data, start, stop):
        if kind == NFTA_SET_ELEM_FLAGS:
            if y - x < 4:
                raise NetlinkError(errno.EPROTO, "short set element flags")
            return bool(struct.unpack_from("!I", data, x)[0] & NFT_SET_ELEM_INTERVAL_END)
    return False


# --- talking to the kernel ----------------------------------------------------------------------

@dataclass(frozen=True)
class SetChange:
    """Elements to delete from and add to one set (deletions run first); flush: empty the set
    first instead (its elements are laid out in a way the deletions could not name)."""

    name: str
    type: str
    delete: Tuple[Element, ...] = ()
    add: Tuple[Element, ...] = ()
    flush: bool = False


@contextlib.contextmanager
def _as_netlink_error(what: str) -> Iterator[None]:
    """Socket errors (a timeout, ENOBUFS) as the project's own error; EPERM stays a
    PermissionError, which the CLI answers with "run as root"."""
    try:
        yield
    except PermissionError:
        raise
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise PermissionError(exc.code, f"{what}: {os.strerror(exc.code)}") from None
        raise
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in (errno.EPERM, errno.EACCES):
            raise PermissionError(code, f"{what}: {os.strerror(code)}") from None
        raise NetlinkError(code, f"{what}: {exc.strerror or exc}") from None


class NftNetlink:
    """A NETLINK_NETFILTER socket in the caller's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(30.0)
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):  # older kernels: full echoes, no error text
                self.sock.setsockopt(SOL_NETLINK, option, 1)
        self.seq = 1
        self.buf = bytearray(1 << 20)
        self.writes = 0  # committed batches

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def _recv(self) -> memoryview:
        n = self.sock.recv_into(self.buf)
        return memoryview(self.buf)[:n]

    def generation(self) -> int:
        """nftables' ruleset generation: every committed transaction, anyone's, moves it on."""
        with _as_netlink_error("read the nftables generation"):
            return self._generation()

    def _generation(self) -> int:
        seq = self._next()
        self.sock.send(message(nft_type(NFT_MSG_GETGEN), NLM_F_REQUEST, seq, socket.AF_UNSPEC, b""))
        while True:
            data = self._recv()
            for kind, flags, mseq, a, b in messages(data):
                if mseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code, _, text = parse_error(data, a, b, flags)
                    raise NetlinkError(code, text)
                for akind, x, y in attrs(data, a + 4, b):
                    if akind == NFTA_GEN_ID and y - x >= 4:
                        return int(struct.unpack_from("!I", data, x)[0])
                raise NetlinkError(errno.EPROTO, "no generation in the answer")

    def set_elements(self, table: str, set_name: str, set_type: str, interval: bool = True,
                     attempts: int = 5) -> Tuple[Intervals, bool]:
        """A set's contents (one dump; again if a concurrent change interrupted it), and whether
        its elements are laid out as we (and nft) would load those contents: someone's
        `nft add element` of a range adjacent to another leaves two boundaries where one
        range's worth of deletions would find one."""
        with _as_netlink_error(f"read set {table} {set_name}"):
            return self._set_elements(table, set_name, set_type, interval, attempts)

    def _set_elements(self, table: str, set_name: str, set_type: str, interval: bool,
                      attempts: int) -> Tuple[Intervals, bool]:
        payload = attr(NFTA_SET_ELEM_LIST_TABLE, _strz(table)) + attr(NFTA_SET_ELEM_LIST_SET,
                                                                     _strz(set_name))
        for _ in range(attempts):
            seq = self._next()
            self.sock.send(message(nft_type(NFT_MSG_GETSETELEM), NLM_F_REQUEST | NLM_F_DUMP, seq,
                                   NFPROTO_INET, payload))
            elements: List[Tuple[int, bool]] = []
            interrupted = done = False
            while not done:
                data = self._recv()
                for kind, flags, mseq, a, b in messages(data):
                    if mseq != seq:
                        continue
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    if kind == NLMSG_DONE:
                        done = True
                    elif kind == NLMSG_ERROR:
                        code, _, text = parse_error(data, a, b, flags)
                        raise NetlinkError(code, text or f"set {table} {set_name}")
                    elif kind == nft_type(NFT_MSG_NEWSETELEM):
                        elements += parse_set_elements(data, a, b)
            if not interrupted:
                contents = from_kernel(set_type, elements, interval)
                if not interval:  # single keys: no layout to get wrong
                    return contents, True
                laid_out = {(k, e) for k, e, _ in to_kernel(set_type, contents)}
                return contents, set(elements) == laid_out and len(elements) == len(laid_out)
        raise NetlinkError(errno.EAGAIN, f"set {table} {set_name} kept changing while read")

    def change_sets(self, table: str, changes: Sequence[SetChange], genid: int | None) -> int:
        """Apply the changes in one transaction; the number of netlink messages it took."""
        with _as_netlink_error(f"change sets of table {table}"):
            return self._change_sets(table, changes, genid)

    def _change_sets(self, table: str, changes: Sequence[SetChange], genid: int | None) -> int:
        first = self.seq
        msgs: List[bytes] = []
        for change in changes:
            if change.flush:  # DELSETELEM without elements empties the set
                msgs.append(message(nft_type(NFT_MSG_DELSETELEM), NLM_F_REQUEST | NLM_F_ACK,
                                    first + 1 + len(msgs), NFPROTO_INET,
                                    attr(NFTA_SET_ELEM_LIST_TABLE, _strz(table))
                                    + attr(NFTA_SET_ELEM_LIST_SET, _strz(change.name))))
        for verb, field in ((NFT_MSG_DELSETELEM, "delete"), (NFT_MSG_NEWSETELEM, "add")):
            for change in changes:
                elements = getattr(change, field)
                if elements:
                    msgs += element_messages(verb, table, change.name,
                                             pack_elements(change.type, elements),
                                             first + 1 + len(msgs))
        if not msgs:
            return 0
        self.seq = first + 2 + len(msgs)
        data = batch(msgs, first, genid)
        # the batch is one datagram; the kernel queues an ack per message before we read any
        for options, size in (((SO_SNDBUFFORCE, socket.SO_SNDBUF), len(data) + 65536),
                              ((SO_RCVBUFFORCE, socket.SO_RCVBUF), max(1 << 20, 2048 * len(msgs)))):
            for option in options:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, option, size)
                    break
                except OSError:
                    continue
        self.sock.send(data)
        waiting = set(range(first + 1, first + 1 + len(msgs)))
        errors: Dict[int, Tuple[int, str]] = {}
        while waiting:
            reply = self._recv()
            for kind, flags, _, a, b in messages(reply):
                if kind != NLMSG_ERROR:
                    continue
                code, seq, text = parse_error(reply, a, b, flags)
                if seq == first and code:  # the batch itself: generation check or commit
                    if code == errno.ERESTART:
                        raise GenerationMoved(code, text or f"nftables moved on from generation "
                                                            f"{genid}, where this was planned")
                    raise NetlinkError(code, text or "nftables refused the batch")
                waiting.discard(seq)
                if code:
                    errors[seq] = (code, text)
        if errors:
            code, text = errors[min(errors)]
            raise NetlinkError(code, text or f"set elements in table {table}")
        self.writes += 1
        return len(msgs)
