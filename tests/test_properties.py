"""Property-based tests (hypothesis): malformed rings and malformed vhost-user streams.

1. Random descriptor tables, indirect tables and avail rings fed to SplitQueue + BlockDevice
   never raise anything but QueueError and never write guest memory outside the writable
   buffers of the chains the device accepted and the used ring, nor outside the regions
   (canary bytes around and between them stay intact).
2. Random bytes, and valid message streams with random mutations, fed to MessageReader +
   BackendSession never raise anything but ProtocolError and never leak an fd.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import memfd
from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.testing.fuzz import feed_session
from pvbus.vhost_user.backend import BackendSession
from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import ProtocolError
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    ConfigSpace,
    Empty,
    MemTable,
    Message,
    Region,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
)
from pvbus.virtio.driver import ring_layout
from pvbus.virtio.errors import QueueError, VirtioError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.split import Buffer, DescriptorChain, SplitQueue

SETTINGS = settings(
    max_examples=int(os.environ.get("PVBUS_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

U64_MAX = (1 << 64) - 1


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prop") / "disk.img"
    path.write_bytes(bytes(64 * 512))
    return path


# -- 1. rings ---------------------------------------------------------------------------

BASE = 0x10000
HALF = 0x8000  # two regions of 32 KiB with a 4 KiB gap between them
GAP = 0x1000
CANARY = 0x1000
SIZE = 8  # queue size
DESC, AVAIL, USED, _ = ring_layout(SIZE, BASE)
DATA = BASE + 0x2000  # headers, indirect tables and buffers go from here
LOW_END = BASE + HALF
HIGH = LOW_END + GAP
HIGH_END = HIGH + HALF


class RecordingQueue(SplitQueue):
    """A SplitQueue that records the writable buffers of every chain it hands the device."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.allowed: list[Buffer] = []

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        chain = super().pop(mem)
        if chain is not None:
            self.allowed.extend(chain.writable)
        return chain


addresses = st.one_of(
    st.integers(DATA, LOW_END),
    st.integers(HIGH - 64, HIGH_END),
    st.sampled_from(
        [0, BASE - 1, LOW_END - 1, LOW_END - 16, HIGH - 1, HIGH_END - 1, HIGH_END, U64_MAX - 15]
    ),
    st.integers(0, U64_MAX),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 24, 32, 512, 513, 4096, 0xFFFF_FFFF]),
    st.integers(0, 0x9000),
)
flag_values = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
next_values = st.one_of(st.integers(0, SIZE + 1), st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flag_values, next_values)
blk_headers = st.tuples(
    st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0xFFFF_FFFF]),
    st.one_of(st.integers(0, 70), st.integers(0, U64_MAX)),
)
segments = st.tuples(st.integers(0, 70), st.integers(0, 70), st.sampled_from([0, 1, 2]))


in_data = st.integers(DATA, DATA + 0x4000).map(lambda a: a & ~15)
data_lengths = st.one_of(st.sampled_from([1, 16, 511, 512, 1024]), st.integers(0, 2048))


@st.composite
def chains(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """One well-formed blk-like chain: header, data buffers, status (``next`` filled later)."""
    slot = draw(st.integers(0, 200))
    descs = [(DATA + 16 * slot, draw(st.sampled_from([16, 16, 8, 24, 528])), 0, 0)]
    for _ in range(draw(st.integers(0, 3))):
        writable = draw(st.booleans())
        descs.append((draw(in_data), draw(data_lengths), 2 if writable else 0, 0))
    descs.sort(key=lambda d: d[2])  # readable first
    descs.append((draw(in_data), draw(st.sampled_from([1, 1, 2, 0])), 2, 0))
    return descs


@st.composite
def ring_scenarios(draw: st.DrawFn) -> dict[str, object]:
    """Mostly well-formed requests, then a few random corruptions of any field."""
    table: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * SIZE
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]] = []
    heads: list[int] = []
    headers: list[tuple[int, tuple[int, int]]] = []
    free = 0
    for _ in range(draw(st.integers(1, 3))):
        chain = draw(chains())
        headers.append(((chain[0][0] - DATA) // 16, draw(blk_headers)))
        if draw(st.booleans()):  # as an indirect table
            slot = 300 + 10 * len(indirect)
            linked = [
                (a, n, f | (1 if i + 1 < len(chain) else 0), i + 1)
                for i, (a, n, f, _) in enumerate(chain)
            ]
            indirect.append((slot, linked))
            chain = [(DATA + 16 * slot, 16 * len(chain), 4, 0)]
        if free + len(chain) > SIZE:
            break
        heads.append(free)
        for i, (a, n, f, _) in enumerate(chain):
            more = i + 1 < len(chain)
            table[free + i] = (a, n, f | (1 if more else 0), free + i + 1 if more else 0)
        free += len(chain)
    for index, field, value in draw(
        st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 3), descriptors), max_size=3)
    ):
        d = list(table[index])
        d[field] = value[field]
        table[index] = (d[0], d[1], d[2], d[3])
    for entry, field, value in draw(
        st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), descriptors), max_size=2)
    ):
        if indirect:
            slot, entries = indirect[entry % len(indirect)]
            d = list(entries[entry % len(entries)])
            d[field] = value[field]
            entries[entry % len(entries)] = (d[0], d[1], d[2], d[3])
    base = draw(st.sampled_from([0, 0xFFFE]))
    ring = [0] * SIZE
    for i, head in enumerate(heads):
        ring[(base + i) % SIZE] = head
    avail_idx = (base + len(heads)) & 0xFFFF
    if draw(st.integers(0, 9)) == 0:
        avail_idx = draw(st.integers(0, 0xFFFF))
    if draw(st.integers(0, 9)) == 0:
        ring[draw(st.integers(0, SIZE - 1))] = draw(next_values)
    return {
        "table": table,
        "indirect": indirect,
        "headers": headers
        + draw(st.lists(st.tuples(st.integers(0, 200), blk_headers), max_size=2)),
        "segments": draw(st.lists(st.tuples(st.integers(0, 200), segments), max_size=3)),
        "avail_flags": draw(st.integers(0, 1)),
        "avail_idx": avail_idx,
        "ring": ring,
        "used_event": draw(st.integers(0, 0xFFFF)),
        "base": base,
        "event_idx": draw(st.booleans()),
        "kicks": draw(st.integers(1, 2)),
    }


def build_guest(s: dict[str, object]) -> tuple[bytearray, GuestMemory]:
    big = bytearray(b"\xcc" * (CANARY + HIGH_END - BASE + CANARY))
    guest = memoryview(big)[CANARY : CANARY + HIGH_END - BASE]
    guest[:] = bytes(len(guest))

    def put(gpa: int, data: bytes) -> None:
        guest[gpa - BASE : gpa - BASE + len(data)] = data

    def desc(d: tuple[int, int, int, int]) -> bytes:
        return struct.pack("<QIHH", *d)

    table = s["table"]
    assert isinstance(table, list)
    put(DESC, b"".join(desc(d) for d in table))
    ring = s["ring"]
    assert isinstance(ring, list)
    put(AVAIL, struct.pack("<HH", s["avail_flags"], s["avail_idx"]))
    put(AVAIL + 4, struct.pack(f"<{SIZE}H", *ring))
    put(AVAIL + 4 + 2 * SIZE, struct.pack("<H", s["used_event"]))
    indirect = s["indirect"]
    assert isinstance(indirect, list)
    for slot, entries in indirect:
        put(DATA + 16 * slot, b"".join(desc(d) for d in entries))
    headers = s["headers"]
    assert isinstance(headers, list)
    for slot, (rtype, sector) in headers:
        put(DATA + 16 * slot, struct.pack("<IIQ", rtype, 0, sector))
    segs = s["segments"]
    assert isinstance(segs, list)
    for slot, seg in segs:
        put(DATA + 16 * slot, struct.pack("<QII", *seg))
    mem = GuestMemory(
        [
            MemoryRegion.from_buffer(BASE, guest[: LOW_END - BASE]),
            MemoryRegion.from_buffer(HIGH, guest[HIGH - BASE :]),
        ]
    )
    # The gap between the regions is a canary too.
    guest[LOW_END - BASE : HIGH - BASE] = b"\xcc" * GAP
    return big, mem


def in_guest(big: bytearray, gpa: int) -> int:
    return CANARY + gpa - BASE


@given(ring_scenarios())
@SETTINGS
def test_random_rings_only_raise_queue_error_and_stay_in_bounds(
    image: Path, scenario: dict[str, object]
) -> None:
    big, mem = build_guest(scenario)
    before = bytes(big)
    device = BlockDevice(BlkConfig(str(image), queue_size=SIZE))
    queue = RecordingQueue(SIZE)
    try:
        queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
        queue.event_idx = bool(scenario["event_idx"])
        base = scenario["base"]
        assert isinstance(base, int)
        queue.set_base(base)
        queue.ready = True
        device.queues[0] = queue
        device.mem = mem
        for _ in range(int(scenario["kicks"])):  # type: ignore[call-overload]
            with contextlib.suppress(QueueError):
                device.process(0)
    finally:
        device.close()
    after = bytes(big)
    # Bytes the device may have written: the used ring (with avail_event) and writable buffers.
    allowed = bytearray(len(big))
    spans = [(USED, 6 + 8 * SIZE), *queue.allowed]
    for gpa, length in spans:
        for region in mem.regions:
            start, end = max(gpa, region.gpa), min(gpa + length, region.end)
            if start < end:
                allowed[in_guest(big, start) : in_guest(big, end)] = b"\x01" * (end - start)
    diff = int.from_bytes(before, "little") ^ int.from_bytes(after, "little")
    changed = [
        m.start()
        for m in re.finditer(rb"[^\x00]", diff.to_bytes(len(big), "little"))
        if not allowed[m.start()]
    ]
    assert changed == [], f"bytes changed outside the allowed buffers: {changed[:8]}"
    assert after[:CANARY] == b"\xcc" * CANARY
    assert after[-CANARY:] == b"\xcc" * CANARY
    gap = in_guest(big, LOW_END)
    assert after[gap : gap + GAP] == b"\xcc" * GAP


def test_the_ring_property_reaches_the_device() -> None:
    """The scenario above can build a valid request: the harness really exercises blk."""
    _big, mem = build_guest(
        {
            "table": [
                (DATA, 16, 1, 1),
                (DATA + 512, 513, 2, 0),
                *[(0, 0, 0, 0)] * (SIZE - 2),
            ],
            "indirect": [],
            "headers": [(0, (0, 0))],
            "segments": [],
            "avail_flags": 0,
            "avail_idx": 1,
            "ring": [0] * SIZE,
            "used_event": 0,
        }
    )
    queue = SplitQueue(SIZE)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    chain = queue.pop(mem)
    assert chain is not None
    assert chain.writable == [(DATA + 512, 513)]


# -- 2. vhost-user streams --------------------------------------------------------------

GPA = 0x1_0000_0000
UADDR = 0x7F00_0000_0000
MEM = 1 << 16


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class ProcessingListener:
    """Processes a ring as soon as it starts, as the server does; only QueueError may come."""

    def __init__(self) -> None:
        self.session: BackendSession | None = None

    def ring_started(self, index: int, kick_fd: int | None) -> None:
        assert self.session is not None
        try:
            self.session.device.process(index)
        except VirtioError as err:
            assert isinstance(err, QueueError)
            # Without its traceback: the log record pytest keeps would otherwise hold the
            # frames, their ring views, and so the mapping (and its fd) alive.
            self.session.ring_failed(index, err.with_traceback(None))

    def ring_stopped(self, index: int) -> None:
        pass


def make_fd(kind: str) -> int:
    if kind == "mem":
        return memfd(MEM)
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def valid_setup() -> list[tuple[Message, tuple[str, ...]]]:
    """A well-formed session: features, memory, one started ring (fds named, made later)."""
    desc, avail, used, _ = ring_layout(8, GPA)
    features = (1 << 32) | (1 << 28) | (1 << 29) | (1 << F_PROTOCOL_FEATURES)
    return [
        (Message(Request.GET_FEATURES, Empty()), ()),
        (Message(Request.SET_OWNER, Empty()), ()),
        (Message(Request.SET_FEATURES, U64(features)), ()),
        (Message(Request.GET_PROTOCOL_FEATURES, Empty()), ()),
        (Message(Request.SET_PROTOCOL_FEATURES, U64(0x1_A209)), ()),
        (Message(Request.SET_MEM_TABLE, MemTable((Region(GPA, MEM, UADDR, 0),)), 9), ("mem",)),
        (Message(Request.SET_VRING_NUM, VringState(0, 8)), ()),
        (
            Message(
                Request.SET_VRING_ADDR,
                VringAddr(0, 0, desc - GPA + UADDR, used - GPA + UADDR, avail - GPA + UADDR),
            ),
            (),
        ),
        (Message(Request.SET_VRING_BASE, VringState(0, 0)), ()),
        (Message(Request.SET_VRING_CALL, U64(0)), ("event",)),
        (Message(Request.SET_VRING_KICK, U64(0)), ("event",)),
        (Message(Request.SET_VRING_ENABLE, VringState(0, 1)), ()),
    ]


small = st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF_FFFF))
u64s = st.one_of(st.integers(0, 0x1FF), st.integers(0, U64_MAX))
regions = st.builds(
    Region,
    st.sampled_from([GPA, GPA + 0x1000, 0, U64_MAX - 0xFFF]),
    st.sampled_from([0x1000, MEM, 2 * MEM, U64_MAX]),
    st.sampled_from([UADDR, UADDR + MEM, 0]),
    st.sampled_from([0, 0x1000, MEM]),
)
random_messages = st.one_of(
    st.builds(
        lambda r, v: (Message(r, U64(v)), ("event",) if r >= 12 and not v & 0x100 else ()),
        st.sampled_from(
            [
                Request.SET_FEATURES,
                Request.SET_PROTOCOL_FEATURES,
                Request.SET_STATUS,
                Request.SET_VRING_KICK,
                Request.SET_VRING_CALL,
                Request.SET_VRING_ERR,
            ]
        ),
        u64s,
    ),
    st.builds(
        lambda r, i, n: (Message(r, VringState(i, n)), ()),
        st.sampled_from(
            [
                Request.SET_VRING_NUM,
                Request.SET_VRING_BASE,
                Request.GET_VRING_BASE,
                Request.SET_VRING_ENABLE,
            ]
        ),
        small,
        small,
    ),
    st.builds(
        lambda r: (Message(r, Empty()), ()),
        st.sampled_from(
            [
                Request.GET_FEATURES,
                Request.RESET_OWNER,
                Request.RESET_DEVICE,
                Request.GET_STATUS,
                Request.GET_QUEUE_NUM,
                Request.GET_MAX_MEM_SLOTS,
            ]
        ),
    ),
    st.builds(
        lambda i, d, u, a: (Message(Request.SET_VRING_ADDR, VringAddr(i, 0, d, u, a)), ()),
        small,
        u64s,
        u64s,
        u64s,
    ),
    st.builds(
        lambda rs: (Message(Request.SET_MEM_TABLE, MemTable(tuple(rs))), ("mem",) * len(rs)),
        st.lists(regions, max_size=3),
    ),
    st.builds(
        lambda r, reg: (Message(r, SingleRegion(reg)), ("mem",)),
        st.sampled_from([Request.ADD_MEM_REG, Request.REM_MEM_REG]),
        regions,
    ),
    st.builds(
        lambda r, off, size: (Message(r, ConfigSpace(off, size, 0, bytes(size))), ()),
        st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]),
        st.integers(0, 256),
        st.integers(0, 256),
    ),
)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "fd_move"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    ),
    max_size=4,
)


def run_stream(image: Path, chunks: list[tuple[bytes, list[int]]]) -> None:
    """Feed ``chunks`` like the server does; every error must be a ProtocolError."""
    device = BlockDevice(BlkConfig(str(image), queue_size=8))
    listener = ProcessingListener()
    session = BackendSession(device, listener)
    listener.session = session
    reader = MessageReader("backend")
    pending = [fd for _, fds in chunks for fd in fds]
    try:
        for data, fds in chunks:
            for fd in fds:
                pending.remove(fd)
            try:
                feed_session(reader, session, data, fds)
            except ProtocolError:
                break
    finally:
        for fd in pending:  # chunks never delivered
            os.close(fd)
        for fd in reader.close():
            os.close(fd)
        session.close()
        device.close()


@given(
    st.lists(
        st.tuples(st.binary(max_size=80), st.lists(st.sampled_from(["mem", "event"]), max_size=3)),
        max_size=6,
    )
)
@SETTINGS
def test_random_bytes_only_raise_protocol_errors(
    image: Path, raw: list[tuple[bytes, list[str]]]
) -> None:
    before = open_fds()
    chunks = [(data, [make_fd(kind) for kind in kinds]) for data, kinds in raw]
    run_stream(image, chunks)
    assert open_fds() == before


@given(st.lists(random_messages, max_size=8), mutations, st.booleans())
@SETTINGS
def test_mutated_valid_streams_only_raise_protocol_errors(
    image: Path,
    extra: list[tuple[Message, tuple[str, ...]]],
    mutate: list[tuple[str, int, int]],
    with_setup: bool,
) -> None:
    before = open_fds()
    messages = (valid_setup() if with_setup else []) + extra
    wires = [(bytearray(encode(msg)[0]), list(kinds)) for msg, kinds in messages]
    for op, where, value in mutate:
        if not wires:
            break
        wire, kinds = wires[where % len(wires)]
        pos = value % (len(wire) + 1)
        if op == "flip" and wire:
            wire[min(pos, len(wire) - 1)] ^= 1 << (value % 8) or 1
        elif op == "insert":
            wire[pos:pos] = bytes([value])
        elif op == "delete" and wire:
            del wire[min(pos, len(wire) - 1)]
        elif op == "fd_move" and kinds:
            other = wires[value % len(wires)][1]
            other.append(kinds.pop())
    chunks = [(bytes(w), [make_fd(k) for k in kinds]) for w, kinds in wires]
    run_stream(image, chunks)
    assert open_fds() == before


def test_the_valid_setup_starts_a_ring(image: Path) -> None:
    """Unmutated, the setup stream is accepted and starts ring 0 (the property goes deep)."""
    device = BlockDevice(BlkConfig(str(image), queue_size=8))
    session = BackendSession(device, ProcessingListener())
    assert isinstance(session.listener, ProcessingListener)
    session.listener.session = session
    reader = MessageReader("backend")
    try:
        for msg, kinds in valid_setup():
            wire, _ = encode(msg)
            reader.receive_data(wire, [make_fd(k) for k in kinds])
            decoded = reader.next_message()
            assert decoded is not None
            session.handle(decoded)
        assert session.rings[0].started
        assert session.rings[0].enabled
    finally:
        session.close()
        device.close()
