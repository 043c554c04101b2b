"""The C loop of the split ring (``pvbus.virtio._fastring``) against its Python twin.

``SplitQueue.pop_frames`` and ``add_used_heads`` run in C where the extension is built and in
Python otherwise; both must give the same views, heads, indices and ring bytes for any ring a
driver can write, malformed ones included (hypothesis generates them).
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvbus.virtio import split
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.split import SplitQueue

needs_c = pytest.mark.skipif(not split.FAST_RING, reason="pvbus.virtio._fastring not built")

# Two regions with a hole between them; rings in the first.
LOW, LOW_SIZE = 0x1000, 0x8000
HIGH, HIGH_SIZE = 0x20000, 0x4000
RINGS = LOW  # desc table, then avail ring, then used ring (queue size <= 256 fits)


class Ring:
    """A queue of ``size`` over fresh two-region guest memory."""

    def __init__(self, size: int) -> None:
        self.low = bytearray(LOW_SIZE)
        self.high = bytearray(HIGH_SIZE)
        self.mem = GuestMemory(
            [MemoryRegion.from_buffer(LOW, self.low), MemoryRegion.from_buffer(HIGH, self.high)]
        )
        self.queue = SplitQueue(max_size=256)
        q = self.queue
        q.size = size
        q.desc_addr = RINGS
        q.avail_addr = RINGS + 16 * size
        q.used_addr = (q.avail_addr + 6 + 2 * size + 3) & ~3
        q.ready = True

    def ram(self, gpa: int) -> tuple[bytearray, int]:
        return (self.low, gpa - LOW) if gpa < HIGH else (self.high, gpa - HIGH)

    def write(self, gpa: int, data: bytes) -> None:
        buf, off = self.ram(gpa)
        buf[off : off + len(data)] = data


# Buffer addresses: in either region, at edges, straddling an end, in the hole, far away.
ADDRS = st.sampled_from(
    [LOW + 0x4000, LOW + 0x6000, LOW + LOW_SIZE - 64, HIGH, HIGH + 0x100, HIGH + HIGH_SIZE - 20,
     0x10000, 0, 2**64 - 16]
)  # fmt: skip
LENGTHS = st.sampled_from([0, 1, 2, 11, 12, 14, 26, 60, 64, 1514, 1526, 4096, 2**32 - 1])
FLAGS = st.sampled_from(
    [0, 0, 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT, 0xFFFF]
)


@st.composite
def rings(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int]], list[int], int, int, bytes]:
    size = draw(st.sampled_from([1, 2, 8, 64, 256]))
    descs = [(draw(ADDRS), draw(LENGTHS), draw(FLAGS)) for _ in range(size)]
    heads = draw(st.lists(st.integers(0, size + 2), min_size=size, max_size=size))
    next_avail = draw(st.integers(0, 0xFFFF))
    ahead = draw(st.integers(0, size + 3))
    prefix = draw(st.binary(min_size=2, max_size=2))
    return size, descs, heads, next_avail, ahead, prefix


Descs = list[tuple[int, int, int]]


def _fill(ring: Ring, descs: Descs, heads: list[int], idx: int, prefix: bytes) -> None:
    size = ring.queue.size
    for i, (addr, length, flags) in enumerate(descs):
        ring.write(RINGS + 16 * i, struct.pack("<QIHH", addr, length, flags, 0))
        inside = LOW <= addr < LOW + LOW_SIZE - 2 or HIGH <= addr < HIGH + HIGH_SIZE - 2
        if inside and not RINGS <= addr < RINGS + 16 * size + 4096:  # never over the rings
            ring.write(addr, prefix)
    for i, head in enumerate(heads):
        ring.write(ring.queue.avail_addr + 4 + 2 * i, struct.pack("<H", head))
    ring.write(ring.queue.avail_addr + 2, struct.pack("<H", idx))


def _implementation(fast: bool) -> contextlib.AbstractContextManager[object]:
    """The C loop as built, or the Python one."""
    return contextlib.nullcontext() if fast else mock.patch.object(split, "_fastring", None)


def _pop(ring: Ring, limit: int, **kw: int) -> tuple[list[tuple[int, bytes]], bytes, int]:
    room = kw.pop("room")
    if kw.pop("batch"):
        if kw.pop("write"):
            return [], b"", -1  # pop_batch takes device-readable chains only
        into = bytearray(b"\xee" * room)
        batch, heads = ring.queue.pop_batch(ring.mem, into, limit, **kw)
        assert batch.data is into and batch.offset(len(batch)) <= len(into)
        return [(-2, f) for f in batch.frames()], heads, ring.queue.next_avail
    views, heads = ring.queue.pop_frames(ring.mem, limit, **kw)  # type: ignore[arg-type]
    where = []
    for view in views:
        # Where the view points: write a marker through it and find it in guest memory.
        if len(view) == 0:
            where.append((-1, b""))
            continue
        old = bytes(view)
        view[:] = b"\xa5" * len(view)
        low, high = bytes(ring.low), bytes(ring.high)
        at = low.find(b"\xa5" * len(view))
        pos = LOW + at if at >= 0 else HIGH + high.find(b"\xa5" * len(view))
        view[:] = old
        where.append((pos, old))
    return where, heads, ring.queue.next_avail


Options = dict[str, int]
OPTIONS = st.fixed_dictionaries(
    {
        "skip": st.sampled_from([0, 12]),
        "min_len": st.sampled_from([0, 14, 60]),
        "max_len": st.sampled_from([1526, 2**32 - 1]),
        "zero_prefix": st.sampled_from([0, 2]),
        "write": st.sampled_from([0, 1]),
        "batch": st.sampled_from([0, 1]),
        "room": st.sampled_from([0, 100, 1600, 65536]),
    }
)


@needs_c
@settings(max_examples=400, deadline=None)
@given(rings(), st.integers(1, 300), OPTIONS)
def test_c_and_python_pop_the_same(
    ring_args: tuple[int, Descs, list[int], int, int, bytes], limit: int, options: Options
) -> None:
    size, descs, heads, next_avail, ahead, prefix = ring_args
    results = []
    for fast in (True, False):
        ring = Ring(size)
        _fill(ring, descs, heads, (next_avail + ahead) & 0xFFFF, prefix)
        ring.queue.set_base(next_avail)
        with _implementation(fast):
            results.append((_pop(ring, limit, **options), bytes(ring.low), bytes(ring.high)))
    assert results[0] == results[1]


IMPLEMENTATIONS = [pytest.param(True, marks=needs_c, id="c"), pytest.param(False, id="python")]


@pytest.mark.parametrize("fast", IMPLEMENTATIONS)
def test_pop_frames_takes_the_simple_chains_and_stops_at_the_rest(fast: bool) -> None:
    with _implementation(fast):
        _pop_frames_story()


def _pop_frames_story() -> None:
    ring = Ring(8)
    frame = b"\0\0" + bytes(10) + b"F" * 60
    ring.write(HIGH, frame)
    ring.write(HIGH + 0x100, frame)
    ring.write(HIGH + 0x200, b"\x01" + frame[1:])  # a header that asks for an offload
    descs = [(HIGH, 72, 0), (HIGH + 0x100, 72, 0), (HIGH + 0x200, 72, 0)]
    for i, (addr, length, flags) in enumerate(descs):
        ring.write(RINGS + 16 * i, struct.pack("<QIHH", addr, length, flags, 0))
    for i, head in enumerate([1, 0, 2]):
        ring.write(ring.queue.avail_addr + 4 + 2 * i, struct.pack("<H", head))
    ring.write(ring.queue.avail_addr + 2, struct.pack("<H", 3))
    q = ring.queue
    views, heads = q.pop_frames(ring.mem, 16, skip=12, min_len=26, zero_prefix=2)
    assert [bytes(v) for v in views] == [b"F" * 60, b"F" * 60]
    assert list(memoryview(heads).cast("H")) == [1, 0]
    assert q.next_avail == 2
    # The offload chain stays available, and a second call takes nothing.
    assert q.pop_frames(ring.mem, 16, skip=12, min_len=26, zero_prefix=2) == ([], b"")
    assert q.next_avail == 2
    chain = q.pop(ring.mem)
    assert chain is not None and chain.head == 2
    # Used entries for the two, then the index, as add_used_many writes them.
    q.add_used_heads(ring.mem, heads)
    used = q.used_addr - LOW
    assert struct.unpack_from("<HH", ring.low, used) == (0, 2)
    assert struct.unpack_from("<IIII", ring.low, used + 4) == (1, 0, 0, 0)
    assert q.next_used == 2


@pytest.mark.parametrize("fast", IMPLEMENTATIONS)
def test_pop_batch_copies_the_simple_chains_back_to_back(fast: bool) -> None:
    ring = Ring(8)
    for i, body in enumerate([b"a" * 60, b"b" * 1500, b"c" * 14]):
        ring.write(HIGH + 0x1000 * i, bytes(12) + body)
        ring.write(RINGS + 16 * i, struct.pack("<QIHH", HIGH + 0x1000 * i, 12 + len(body), 0, 0))
        ring.write(ring.queue.avail_addr + 4 + 2 * i, struct.pack("<H", 2 - i))
    ring.write(ring.queue.avail_addr + 2, struct.pack("<H", 3))
    q = ring.queue
    with _implementation(fast):
        small, heads = q.pop_batch(ring.mem, bytearray(1513), 16, skip=12, zero_prefix=2)
        assert (small.frames(), list(memoryview(heads).cast("H"))) == ([b"c" * 14], [2])
        q.set_base(0)  # the frame of 1500 did not fit: it stayed available
        into = bytearray(4096)
        batch, heads = q.pop_batch(ring.mem, into, 16, skip=12, min_len=26, zero_prefix=2)
    assert list(memoryview(heads).cast("H")) == [2, 1, 0]
    assert batch.frames() == [b"c" * 14, b"b" * 1500, b"a" * 60]  # in ring order
    assert batch.data is into and into[:1574] == b"c" * 14 + b"b" * 1500 + b"a" * 60
    assert [batch.offset(i) for i in range(4)] == [0, 14, 1514, 1574]
    ring.write(HIGH, b"X" * 72)  # a copy: the driver may reuse its buffer
    assert batch.frame(2) == b"a" * 60
    assert batch.head(2).frames() == [b"c" * 14, b"b" * 1500] and len(batch.head(0)) == 0


@needs_c
@given(
    st.lists(st.integers(0, 255), max_size=300), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
)
def test_c_and_python_publish_the_same(heads: list[int], start: int, length: int) -> None:
    raw = struct.pack(f"={len(heads)}H", *heads)
    images = []
    for fast in (True, False):
        ring = Ring(256)
        ring.queue.next_used = start
        with _implementation(fast):
            ring.queue.add_used_heads(ring.mem, raw, length)
        images.append((bytes(ring.low), ring.queue.next_used))
    assert images[0] == images[1]
    assert images[0][1] == (start + len(heads)) & 0xFFFF


@needs_c
def test_c_refuses_bad_arguments() -> None:
    from pvbus.virtio import _fastring

    with pytest.raises(ValueError):
        _fastring.pop_frames(b"", b"", 8, 0, 8, 0, (), 0, 0, 100, 0)  # rings too short
    with pytest.raises(ValueError):
        _fastring.pop_frames(bytes(16), bytes(8), 0, 0, 8, 0, (), 0, 0, 100, 0)  # size 0
    not_a_tuple: Any = []
    with pytest.raises(TypeError):
        _fastring.pop_frames(bytes(128), bytes(22), 8, 0, 8, 0, not_a_tuple, 0, 0, 100, 0)
    with pytest.raises(BufferError):  # guest memory must be writable
        readonly = ((0, 4, memoryview(b"abcd")),)
        _fastring.pop_frames(bytes(128), bytes(22), 8, 0, 8, 0, readonly, 0, 0, 1, 0)
    with pytest.raises(BufferError):  # the used ring too
        _fastring.publish_used(bytes(64), 4, 0, b"\0\0", 0)
    ring = Ring(8)
    _fill(ring, [(HIGH, 100, VIRTQ_DESC_F_WRITE)] * 2, [0, 1], 2, b"")
    q = ring.queue
    assert q.pending(ring.mem) == 2  # binds the ring views
    rings = (q._desc, q._avail, q._used, 8, 0, 0, ring.mem.table)
    ends = struct.pack("=II", 10, 5)
    with pytest.raises(ValueError, match="out of order"):
        _fastring.fill_batch(*rings, bytes(10), ends, 0, b"")
    with pytest.raises(ValueError, match="past the data"):
        _fastring.fill_batch(*rings, bytes(4), struct.pack("=I", 10), 0, b"")
    with pytest.raises(ValueError):
        _fastring.fill_batch(*rings, bytes(10), ends, 3, b"")  # start past the frames
    with pytest.raises(ValueError):
        _fastring.fill_batch(*rings, bytes(10), b"\0\0", 0, b"")  # half an end
    with pytest.raises(ValueError):
        _fastring.publish_used(bytearray(64), 4, 0, b"\0", 0)  # half a head


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    rings(),
    st.lists(st.sampled_from([b"", b"\x01" * 14, b"\x02" * 60, b"\x03" * 1514]), max_size=40),
    st.sampled_from([b"", bytes(12), b"\x09" * 10]),
    st.integers(0, 0xFFFF),
    st.integers(0, 5),
)
def test_c_and_python_fill_the_same(
    ring_args: tuple[int, Descs, list[int], int, int, bytes],
    frames: list[bytes],
    prefix: bytes,
    next_used: int,
    start: int,
) -> None:
    size, descs, heads, next_avail, ahead, fill = ring_args
    results = []
    for fast in (True, False):
        ring = Ring(size)
        _fill(ring, descs, heads, (next_avail + ahead) & 0xFFFF, fill)
        ring.queue.set_base(next_avail)
        ring.queue.next_used = next_used
        with _implementation(fast):
            count = ring.queue.fill_batch(ring.mem, FrameBatch.of(frames), start, prefix)
        q = ring.queue
        results.append((count, q.next_avail, q.next_used, bytes(ring.low), bytes(ring.high)))
    assert results[0] == results[1]


@pytest.mark.parametrize("fast", IMPLEMENTATIONS)
def test_fill_batch_places_in_order_and_stops_at_what_does_not_fit(fast: bool) -> None:
    with _implementation(fast):
        _fill_story()


def _fill_story() -> None:
    ring = Ring(8)
    q = ring.queue
    bufs = [(HIGH, 100, VIRTQ_DESC_F_WRITE), (HIGH + 0x100, 100, VIRTQ_DESC_F_WRITE),
            (HIGH + 0x200, 20, VIRTQ_DESC_F_WRITE)]  # fmt: skip
    _fill(ring, bufs, [0, 1, 2], 3, b"")
    batch = FrameBatch.of([b"Z" * 9, b"A" * 60, b"B" * 60, b"C" * 60, b"D" * 60])
    assert q.fill_batch(ring.mem, batch, 1, b"H" * 12) == 2  # the third chain is too small
    assert ring.high[:72] == b"H" * 12 + b"A" * 60
    assert ring.high[0x100 : 0x100 + 72] == b"H" * 12 + b"B" * 60
    used = q.used_addr - LOW
    assert struct.unpack_from("<HHIIII", ring.low, used) == (0, 2, 0, 72, 1, 72)
    assert (q.next_avail, q.next_used) == (2, 2)
    chain = q.pop(ring.mem)  # the one left is there for the general path
    assert chain is not None and chain.head == 2
    assert q.fill_batch(ring.mem, FrameBatch(b"", b""), 0, b"") == 0
    assert q.fill_batch(ring.mem, batch, 5, b"") == 0  # nothing from the end on
