"""nfnetlink messages for set contents: what we pack, our parser reads back (the same layout
the kernel dumps), split under netlink's 64 KiB attribute limit, inside one guarded batch; and
the parser answers garbage with its own error only."""

from __future__ import annotations

import errno
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxyd.reconciler.nfnetlink import (
    ATTR,
    MAX_NEST,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NLM_F_ACK_TLVS,
    NLMSG_ERROR,
    NetlinkError,
    attr,
    batch,
    element_messages,
    messages,
    nft_type,
    pack_elements,
    parse_error,
    parse_set_elements,
)
from tproxyd.state.intervals import from_kernel, merge, to_kernel

WIDTH = {"ipv4_addr": 32, "ipv6_addr": 128, "inet_service": 16}


@st.composite
def sets(draw):
    set_type = draw(st.sampled_from(sorted(WIDTH)))
    top = (1 << WIDTH[set_type]) - 1
    ranges = draw(st.lists(st.tuples(st.integers(0, top), st.integers(0, 1000)), max_size=40))
    return set_type, merge((lo, min(lo + n, top)) for lo, n in ranges)


def read_back(data: bytes) -> list:
    found = []
    for kind, _, _, a, b in messages(data):
        if kind in (nft_type(NFT_MSG_NEWSETELEM), nft_type(NFT_MSG_DELSETELEM)):
            found += parse_set_elements(data, a, b)
    return found


@given(sets())
def test_packed_elements_parse_back(case):
    set_type, canon = case
    elements = to_kernel(set_type, canon)
    data = b"".join(element_messages(NFT_MSG_NEWSETELEM, "tproxyd", "lan_dst4",
                                     pack_elements(set_type, elements), seq=7))
    assert read_back(data) == [(key, end) for key, end, _ in elements]
    assert from_kernel(set_type, read_back(data)) == canon


def test_big_sets_split_into_messages_under_the_attribute_limit():
    canon = tuple((i * 256, i * 256 + 127) for i in range(20_000))
    elements = to_kernel("ipv4_addr", canon)
    msgs = list(element_messages(NFT_MSG_NEWSETELEM, "tproxyd", "lan_dst4",
                                 pack_elements("ipv4_addr", elements), seq=100))
    assert len(msgs) > 1
    assert [struct.unpack_from("=I", m, 8)[0] for m in msgs] == list(range(100, 100 + len(msgs)))
    assert all(len(m) - 16 - 4 < 65535 and len(m) <= MAX_NEST + 200 for m in msgs)
    assert from_kernel("ipv4_addr", read_back(b"".join(msgs))) == canon


def test_a_batch_is_begin_messages_end_and_carries_the_generation():
    body = list(element_messages(NFT_MSG_DELSETELEM, "t", "s",
                                 pack_elements("inet_service", [(80, False, False)]), seq=2))
    data = batch(body, seq=1, genid=41)
    kinds = [(kind, seq) for kind, _, seq, _, _ in messages(data)]
    assert kinds == [(NFNL_MSG_BATCH_BEGIN, 1), (nft_type(NFT_MSG_DELSETELEM), 2),
                     (NFNL_MSG_BATCH_END, 1)]
    begin_payload = data[16 + 4:struct.unpack_from("=I", data)[0]]
    assert begin_payload == attr(1, struct.pack("!I", 41))
    assert len(batch(body, seq=1, genid=None)) == len(data) - 8  # no generation: no check


def test_an_error_names_the_message_and_carries_the_kernels_text():
    request = struct.pack("=IHHII", 40, nft_type(NFT_MSG_NEWSETELEM), 5, 9, 0)
    text = attr(1, b"interval overlaps with an existing one\0")
    payload = struct.pack("=i", -errno.EEXIST) + request + text
    data = struct.pack("=IHHII", 16 + len(payload), NLMSG_ERROR, NLM_F_ACK_TLVS, 9, 0) + payload
    ((_kind, flags, _, a, b),) = list(messages(data))
    assert parse_error(data, a, b, flags) == (errno.EEXIST, 9,
                                              "interval overlaps with an existing one")


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_only_netlink_errors(data):
    try:
        for _, _, _, a, b in messages(data):
            parse_set_elements(data, a, b)
    except NetlinkError:
        pass


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=24)), max_size=6))
def test_malformed_elements_raise_only_netlink_errors(parts):
    # well-framed messages whose element attributes hold anything
    body = b"".join(ATTR.pack(4 + len(p), 1 | 0x8000) + p + b"\0" * (-len(p) % 4) for _, p in parts)
    nest = ATTR.pack(4 + len(body), 3 | 0x8000) + body
    payload = b"\x01\x00\x00\x00" + nest
    data = struct.pack("=IHHII", 16 + len(payload), nft_type(NFT_MSG_NEWSETELEM), 2, 1, 0) + payload
    try:
        for _, _, _, a, b in messages(data):
            parse_set_elements(data, a, b)
    except NetlinkError:
        pass


def _nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """Written out independently of the module under test."""
    head = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


# The NEWSETELEM message nft 1.0.6 sent for `add element inet t s { 198.18.0.0/24,
# 255.255.255.0/24 }` (from `nft --debug=mnl`): note it puts FLAGS before KEY, numbers the list
# entries 1..4 and adds a SET_ID; attribute order and list numbering mean nothing to the kernel.
NFT_SENT = (struct.pack("=IHHII", 140, 0x0A0C, 1, 1, 0) + b"\x01\x00\x00\x00"
            + _nla(1, b"t\0") + _nla(2, b"s\0") + _nla(4, b"\x00\x00\x00\x01")
            + _nla(3, nested=True, payload=(
                _nla(1, _nla(3, b"\x00\x00\x00\x01") + _nla(1, _nla(1, b"\x00\x00\x00\x00"), True), True)
                + _nla(2, _nla(1, _nla(1, b"\xc6\x12\x00\x00"), True), True)
                + _nla(3, _nla(3, b"\x00\x00\x00\x01") + _nla(1, _nla(1, b"\xc6\x12\x01\x00"), True), True)
                + _nla(4, _nla(1, _nla(1, b"\xff\xff\xff\x00"), True) + _nla(6, b"\x01\x04\x01\x00\x00\x00"),
                       True))))


def _element_attrs(data: bytes) -> list:
    """Each element of a message as {attribute type: payload}, order and numbering aside."""
    from tproxyd.reconciler.nfnetlink import attrs

    out = []
    for _, _, _, a, b in messages(data):
        for kind, x, y in attrs(data, a + 4, b):
            if kind == 3:
                out += [{k: bytes(data[p:q]) for k, p, q in attrs(data, ea, eb)}
                        for _, ea, eb in attrs(data, x, y)]
    return out


def test_we_send_what_nft_sends_and_read_what_it_sends():
    assert len(NFT_SENT) == 140
    canon = ((0xC6120000, 0xC61200FF), (0xFFFFFF00, 0xFFFFFFFF))
    ours = b"".join(element_messages(NFT_MSG_NEWSETELEM, "t", "s",
                                     pack_elements("ipv4_addr", to_kernel("ipv4_addr", canon)), seq=1))
    assert _element_attrs(ours) == _element_attrs(NFT_SENT)
    ((_, _, _, a, b),) = list(messages(NFT_SENT))
    assert parse_set_elements(NFT_SENT, a, b) == [(0, True), (0xC6120000, False),
                                                  (0xC6120100, True), (0xFFFFFF00, False)]
