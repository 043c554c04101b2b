"""vhost-user codec: (message, bytes) tables checked both ways, fed whole, bytewise and with
trailing garbage; fd attribution and every way a peer can get the framing wrong."""

from __future__ import annotations

import struct

import pytest

from pvbus.vhost_user.codec import MessageReader, Role, encode
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import (
    MAX_PAYLOAD,
    U64,
    ConfigSpace,
    Empty,
    Flags,
    Inflight,
    MemTable,
    Message,
    Region,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
)

V = int(Flags.VERSION)
NEED = int(Flags.VERSION | Flags.NEED_REPLY)
REPLY = int(Flags.VERSION | Flags.REPLY)


def hdr(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


R1 = Region(0x0, 0x4000_0000, 0x7F00_0000_0000, 0)
R2 = Region(0x1_0000_0000, 0x2000_0000, 0x7F10_0000_0000, 0x1000)
R1_BYTES = struct.pack("<QQQQ", 0x0, 0x4000_0000, 0x7F00_0000_0000, 0)
R2_BYTES = struct.pack("<QQQQ", 0x1_0000_0000, 0x2000_0000, 0x7F10_0000_0000, 0x1000)
CONFIG_DATA = bytes(range(60))

# (message, wire bytes) of every request the backend decodes.
REQUESTS: list[tuple[Message, bytes]] = [
    (Message(Request.GET_FEATURES, Empty()), hdr(1, V, 0)),
    (Message(Request.SET_FEATURES, U64(0x1_7000_0000)), hdr(2, V, 8) + u64(0x1_7000_0000)),
    (Message(Request.SET_OWNER, Empty()), hdr(3, V, 0)),
    (Message(Request.RESET_OWNER, Empty()), hdr(4, V, 0)),
    (
        Message(Request.SET_MEM_TABLE, MemTable((R1, R2)), NEED, (100, 101)),
        hdr(5, NEED, 8 + 64) + struct.pack("<II", 2, 0) + R1_BYTES + R2_BYTES,
    ),
    (
        Message(Request.SET_VRING_NUM, VringState(1, 256)),
        hdr(8, V, 8) + struct.pack("<II", 1, 256),
    ),
    (
        Message(Request.SET_VRING_ADDR, VringAddr(0, 1, 0x7F00, 0x7F80, 0x7F40, 0x99)),
        hdr(9, V, 40) + struct.pack("<IIQQQQ", 0, 1, 0x7F00, 0x7F80, 0x7F40, 0x99),
    ),
    (
        Message(Request.SET_VRING_BASE, VringState(0, 0xFFFF)),
        hdr(10, V, 8) + struct.pack("<II", 0, 0xFFFF),
    ),
    (Message(Request.GET_VRING_BASE, VringState(3, 0)), hdr(11, V, 8) + struct.pack("<II", 3, 0)),
    (Message(Request.SET_VRING_KICK, U64(1), V, (7,)), hdr(12, V, 8) + u64(1)),
    (Message(Request.SET_VRING_KICK, U64(0x102)), hdr(12, V, 8) + u64(0x102)),
    (Message(Request.SET_VRING_CALL, U64(0), V, (8,)), hdr(13, V, 8) + u64(0)),
    (Message(Request.SET_VRING_ERR, U64(0x100)), hdr(14, V, 8) + u64(0x100)),
    (Message(Request.GET_PROTOCOL_FEATURES, Empty()), hdr(15, V, 0)),
    (Message(Request.SET_PROTOCOL_FEATURES, U64(0x1_8209)), hdr(16, V, 8) + u64(0x1_8209)),
    (Message(Request.GET_QUEUE_NUM, Empty()), hdr(17, V, 0)),
    (
        Message(Request.SET_VRING_ENABLE, VringState(2, 1)),
        hdr(18, V, 8) + struct.pack("<II", 2, 1),
    ),
    (Message(Request.SET_BACKEND_REQ_FD, Empty(), NEED, (9,)), hdr(21, NEED, 0)),
    (
        Message(Request.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60))),
        hdr(24, V, 72) + struct.pack("<III", 0, 60, 0) + bytes(60),
    ),
    (
        Message(Request.SET_CONFIG, ConfigSpace(32, 1, 0, b"\x01"), NEED),
        hdr(25, NEED, 13) + struct.pack("<III", 32, 1, 0) + b"\x01",
    ),
    (
        Message(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 256)),
        hdr(31, V, 24) + struct.pack("<QQHH4x", 0, 0, 1, 256),
    ),
    (
        Message(Request.SET_INFLIGHT_FD, Inflight(4096, 0, 1, 256), V, (10,)),
        hdr(32, V, 24) + struct.pack("<QQHH4x", 4096, 0, 1, 256),
    ),
    (Message(Request.RESET_DEVICE, Empty()), hdr(34, V, 0)),
    (Message(Request.GET_MAX_MEM_SLOTS, Empty()), hdr(36, V, 0)),
    (
        Message(Request.ADD_MEM_REG, SingleRegion(R2), NEED, (11,)),
        hdr(37, NEED, 40) + bytes(8) + R2_BYTES,
    ),
    (
        Message(Request.REM_MEM_REG, SingleRegion(R1), NEED, (12,)),
        hdr(38, NEED, 40) + bytes(8) + R1_BYTES,
    ),
    (Message(Request.REM_MEM_REG, SingleRegion(R1)), hdr(38, V, 40) + bytes(8) + R1_BYTES),
    (Message(Request.SET_STATUS, U64(0xF)), hdr(39, V, 8) + u64(0xF)),
    (Message(Request.GET_STATUS, Empty()), hdr(40, V, 0)),
]

# (message, wire bytes) of every reply the frontend decodes, REPLY_ACKs included.
REPLIES: list[tuple[Message, bytes]] = [
    (
        Message(Request.GET_FEATURES, U64(0x1_7000_0000), REPLY),
        hdr(1, REPLY, 8) + u64(0x1_7000_0000),
    ),
    (
        Message(Request.GET_PROTOCOL_FEATURES, U64(0x1_8209), REPLY),
        hdr(15, REPLY, 8) + u64(0x1_8209),
    ),
    (Message(Request.GET_QUEUE_NUM, U64(4), REPLY), hdr(17, REPLY, 8) + u64(4)),
    (
        Message(Request.GET_VRING_BASE, VringState(1, 0x1234), REPLY),
        hdr(11, REPLY, 8) + struct.pack("<II", 1, 0x1234),
    ),
    (
        Message(Request.GET_CONFIG, ConfigSpace(0, 60, 0, CONFIG_DATA), REPLY),
        hdr(24, REPLY, 72) + struct.pack("<III", 0, 60, 0) + CONFIG_DATA,
    ),
    (
        Message(Request.GET_INFLIGHT_FD, Inflight(8192, 0, 2, 128), REPLY, (13,)),
        hdr(31, REPLY, 24) + struct.pack("<QQHH4x", 8192, 0, 2, 128),
    ),
    (Message(Request.GET_MAX_MEM_SLOTS, U64(509), REPLY), hdr(36, REPLY, 8) + u64(509)),
    (Message(Request.GET_STATUS, U64(0x4F), REPLY), hdr(40, REPLY, 8) + u64(0x4F)),
    # REPLY_ACK: a u64 reply to a request that has no reply of its own.
    (Message(Request.SET_MEM_TABLE, U64(0), REPLY), hdr(5, REPLY, 8) + u64(0)),
    (Message(Request.ADD_MEM_REG, U64(1), REPLY), hdr(37, REPLY, 8) + u64(1)),
    (Message(Request.SET_VRING_ADDR, U64(0), REPLY), hdr(9, REPLY, 8) + u64(0)),
    (Message(Request.SET_CONFIG, U64(0), REPLY), hdr(25, REPLY, 8) + u64(0)),
]

TABLE = [("backend", m, b) for m, b in REQUESTS] + [("frontend", m, b) for m, b in REPLIES]
IDS = [f"{role}-{m.request.name}-{i}" for i, (role, m, _) in enumerate(TABLE)]


def decode_all(role: Role, chunks: list[tuple[bytes, tuple[int, ...]]]) -> list[Message]:
    reader = MessageReader(role)
    out: list[Message] = []
    for data, fds in chunks:
        reader.receive_data(data, fds)
        while (msg := reader.next_message()) is not None:
            out.append(msg)
    assert reader.close() == []
    return out


@pytest.mark.parametrize(("role", "msg", "wire"), TABLE, ids=IDS)
def test_encode(role: Role, msg: Message, wire: bytes) -> None:
    assert encode(msg) == (wire, msg.fds)


@pytest.mark.parametrize(("role", "msg", "wire"), TABLE, ids=IDS)
def test_decode_whole(role: Role, msg: Message, wire: bytes) -> None:
    assert decode_all(role, [(wire, msg.fds)]) == [msg]


@pytest.mark.parametrize(("role", "msg", "wire"), TABLE, ids=IDS)
@pytest.mark.parametrize("fds_at", ["first", "last"])
def test_decode_one_byte_at_a_time(role: Role, msg: Message, wire: bytes, fds_at: str) -> None:
    at = 0 if fds_at == "first" else len(wire) - 1
    chunks = [(wire[i : i + 1], msg.fds if i == at else ()) for i in range(len(wire))]
    reader = MessageReader(role)
    got: list[Message] = []
    for i, (data, fds) in enumerate(chunks):
        reader.receive_data(data, fds)
        m = reader.next_message()
        if m is not None:
            assert i == len(wire) - 1, "a message before its last byte arrived"
            got.append(m)
    assert got == [msg]


@pytest.mark.parametrize(("role", "msg", "wire"), TABLE, ids=IDS)
def test_decode_with_trailing_garbage(role: Role, msg: Message, wire: bytes) -> None:
    reader = MessageReader(role)
    # An incomplete header yields nothing more.
    reader.receive_data(wire, msg.fds)
    reader.receive_data(b"\xa5" * 11)
    assert reader.next_message() == msg
    assert reader.next_message() is None
    # Once the garbage makes a whole header, it is refused, not decoded into a message.
    with pytest.raises(RemoteProtocolError):
        reader.receive_data(b"\xa5")
    assert reader.next_message() is None


@pytest.mark.parametrize(
    "garbage", [bytes(12), b"\xff" * 12, hdr(1, V | 0x10, 0) + b"xx", hdr(99, V, 0)]
)
@pytest.mark.parametrize("role", ["backend", "frontend"])
def test_garbage_after_a_message_in_one_chunk(role: Role, garbage: bytes) -> None:
    msg, wire = REQUESTS[1] if role == "backend" else REPLIES[0]
    reader = MessageReader(role)
    if garbage[:4] == struct.pack("<I", 1) and role == "backend":
        # GET_FEATURES with an unknown flag bit is still a request; add two bytes of payload.
        garbage = hdr(1, V, 2) + b"xx"
    with pytest.raises(RemoteProtocolError):
        reader.receive_data(wire + garbage)
    assert reader.next_message() == msg
    assert reader.next_message() is None


def test_many_messages_in_one_chunk() -> None:
    wire = b"".join(w for m, w in REQUESTS if not m.fds)
    msgs = [m for m, _ in REQUESTS if not m.fds]
    assert decode_all("backend", [(wire, ())]) == msgs
    # Split at every possible point: same messages.
    for cut in range(0, len(wire), 7):
        assert decode_all("backend", [(wire[:cut], ()), (wire[cut:], ())]) == msgs


# -- fd attribution -------------------------------------------------------------------------


def test_fds_go_to_the_message_holding_the_chunks_last_byte() -> None:
    features = hdr(2, V, 8) + u64(1)
    call = hdr(13, V, 8) + u64(0)
    got = decode_all("backend", [(features + call, (42,))])
    assert got[0].fds == ()
    assert got[1].request is Request.SET_VRING_CALL
    assert got[1].fds == (42,)
    # fds that arrive with a chunk ending inside a message belong to that message.
    got = decode_all("backend", [(features + call[:5], (43,)), (call[5:], ())])
    assert [m.fds for m in got] == [(), (43,)]


def test_fds_attributed_to_the_wrong_message_are_refused_with_the_fds() -> None:
    call = hdr(13, V, 8) + u64(0)
    features = hdr(2, V, 8) + u64(1)
    reader = MessageReader("backend")
    with pytest.raises(RemoteProtocolError, match="SET_VRING_CALL with 0 fds") as info:
        reader.receive_data(call + features, (44,))
    assert info.value.fds == ()
    with pytest.raises(RemoteProtocolError, match="SET_FEATURES with 1 fds") as info:
        reader.receive_data(b"")
    assert info.value.fds == (44,)
    assert reader.close() == []


def test_leftover_fds_are_handed_back() -> None:
    reader = MessageReader("backend")
    reader.receive_data(hdr(13, V, 8) + u64(0)[:4], (45, 46))
    assert reader.next_message() is None
    assert sorted(reader.close()) == [45, 46]
    reader = MessageReader("backend")
    reader.receive_data(hdr(13, V, 8) + u64(0), (47,))
    assert reader.close() == [47]  # decoded but never taken


@pytest.mark.parametrize(
    ("wire", "fds", "match"),
    [
        (hdr(5, V, 8 + 64) + struct.pack("<II", 2, 0) + R1_BYTES + R2_BYTES, (1,), "1 fds"),
        (hdr(5, V, 8 + 32) + struct.pack("<II", 1, 0) + R1_BYTES, (1, 2), "2 fds"),
        (hdr(37, V, 40) + bytes(8) + R1_BYTES, (), "0 fds"),
        (hdr(37, V, 40) + bytes(8) + R1_BYTES, (1, 2), "2 fds"),
        (hdr(38, V, 40) + bytes(8) + R1_BYTES, (1, 2), "2 fds"),
        (hdr(12, V, 8) + u64(0x100), (1,), "1 fds"),  # "no fd" bit, with an fd
        (hdr(12, V, 8) + u64(0), (), "0 fds"),
        (hdr(13, V, 8) + u64(0), (1, 2), "2 fds"),
        (hdr(2, V, 8) + u64(0), (1,), "1 fds"),
        (hdr(21, V, 0), (), "0 fds"),
        (hdr(32, V, 24) + bytes(24), (), "0 fds"),
    ],
)
def test_wrong_fd_counts_raise_with_the_fds(wire: bytes, fds: tuple[int, ...], match: str) -> None:
    reader = MessageReader("backend")
    with pytest.raises(RemoteProtocolError, match=match) as info:
        reader.receive_data(wire, fds)
    assert info.value.fds == fds
    assert reader.next_message() is None
    assert reader.close() == []


def test_reply_with_fds_refused() -> None:
    reader = MessageReader("frontend")
    with pytest.raises(RemoteProtocolError, match="reply with 1 fds") as info:
        reader.receive_data(hdr(1, REPLY, 8) + u64(0), (5,))
    assert info.value.fds == (5,)
    inflight = hdr(31, REPLY, 24) + struct.pack("<QQHH4x", 4096, 0, 1, 128)
    with pytest.raises(RemoteProtocolError, match="reply with 2 fds") as info:
        MessageReader("frontend").receive_data(inflight, (6, 7))
    assert info.value.fds == (6, 7)
    empty = Message(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 128), REPLY)
    assert decode_all("frontend", [(encode(empty)[0], ())]) == [empty]


# -- malformed framing and payloads -------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "wire", "match"),
    [
        ("backend", hdr(1, V, MAX_PAYLOAD + 1), "payload of"),
        ("backend", hdr(1, V, 0xFFFF_FFFF), "payload of"),
        ("frontend", hdr(1, REPLY, MAX_PAYLOAD + 1), "payload of"),
        ("backend", hdr(1, 0, 0), "version"),
        ("backend", hdr(1, 2, 0), "version"),
        ("backend", hdr(1, 3, 0), "version"),
        ("frontend", hdr(1, 0x4, 8) + u64(0), "version"),
        ("backend", hdr(0, V, 0), "unsupported request 0"),
        ("backend", hdr(41, V, 0), "unsupported request 41"),
        ("backend", hdr(0xFFFF_FFFF, V, 0), "unsupported"),
        ("backend", hdr(6, V, 8) + u64(0), "unsupported request 6"),  # SET_LOG_BASE
        ("backend", hdr(1, REPLY, 8) + u64(0), "unexpected reply"),
        ("backend", hdr(11, REPLY, 8) + bytes(8), "unexpected reply"),
        ("frontend", hdr(1, V, 0), "unexpected request"),
        ("frontend", hdr(1, REPLY | 0x8, 8) + u64(0), "asks for a reply"),
        ("backend", hdr(1, V, 8) + u64(0), "empty payload"),
        ("backend", hdr(2, V, 7) + bytes(7), "u64 payload"),
        ("backend", hdr(2, V, 9) + bytes(9), "u64 payload"),
        ("backend", hdr(8, V, 4) + bytes(4), "vring state"),
        ("backend", hdr(9, V, 32) + bytes(32), "vring address"),
        ("backend", hdr(5, V, 4) + bytes(4), "memory table"),
        ("backend", hdr(5, V, 8) + struct.pack("<II", 9, 0), "9 regions"),
        ("backend", hdr(5, V, 8 + 16) + struct.pack("<II", 1, 0) + bytes(16), "memory table"),
        ("backend", hdr(5, V, 8 + 9 * 32) + struct.pack("<II", 1, 0) + bytes(9 * 32), "table"),
        ("backend", hdr(37, V, 32) + R1_BYTES, "single region"),
        ("backend", hdr(24, V, 8) + bytes(8), "config payload"),
        ("backend", hdr(24, V, 12 + 4) + struct.pack("<III", 0, 8, 0) + bytes(4), "config"),
        ("backend", hdr(24, V, 12 + 257) + struct.pack("<III", 0, 257, 0) + bytes(257), "config"),
        ("backend", hdr(24, V, 12 + 8) + struct.pack("<III", 252, 8, 0) + bytes(8), "range"),
        ("backend", hdr(24, V, 12) + struct.pack("<III", 0xFFFF_FFFF, 0, 0), "range"),
        ("backend", hdr(31, V, 8) + bytes(8), "inflight"),
        ("frontend", hdr(11, REPLY, 4) + bytes(4), "vring state"),
        ("frontend", hdr(5, REPLY, 0), "u64 payload"),
    ],
)
def test_malformed_messages(role: Role, wire: bytes, match: str) -> None:
    reader = MessageReader(role)
    with pytest.raises(RemoteProtocolError, match=match):
        reader.receive_data(wire)
    assert reader.next_message() is None


def test_header_only_waits_for_the_payload() -> None:
    reader = MessageReader("backend")
    reader.receive_data(hdr(2, V, 8))
    assert reader.next_message() is None
    reader.receive_data(u64(5)[:7])
    assert reader.next_message() is None
    reader.receive_data(u64(5)[7:])
    assert reader.next_message() == Message(Request.SET_FEATURES, U64(5))


# -- payloads are validated when built ----------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: U64(-1),
        lambda: U64(1 << 64),
        lambda: MemTable((R1,) * 9),
        lambda: ConfigSpace(0, 4, 0, b"abc"),
        lambda: ConfigSpace(0, 257, 0, bytes(257)),
        lambda: VringState(-1, 0),
        lambda: VringState(0, 1 << 32),
        lambda: VringAddr(0, 0, 1 << 64, 0, 0),
        lambda: Region(0, -1, 0, 0),
        lambda: Inflight(0, 0, 1 << 16, 0),
        lambda: ConfigSpace(1 << 32, 0, 0, b""),
    ],
)
def test_payloads_validated_when_built(build: object) -> None:
    assert callable(build)
    with pytest.raises(ValueError):
        build()


def test_message_properties() -> None:
    assert Message(Request.SET_OWNER, Empty(), NEED).need_reply
    assert not Message(Request.SET_OWNER, Empty()).need_reply
    assert Message(Request.GET_FEATURES, U64(1), REPLY).is_reply
