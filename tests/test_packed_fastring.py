"""The packed ring's C loops (``_fastring.packed_pop`` / ``packed_fill`` /
``packed_publish``) against their Python twins in :mod:`pvbus.virtio.packed`: on generated
rings, hostile ones included (any flags, lengths, ids and addresses, any positions and wrap
counters), both must take the same frames, write the same bytes and end in the same state."""

from __future__ import annotations

import contextlib
import struct
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvbus.testing import FakeGuest
from pvbus.virtio import packed
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE
from pvbus.virtio.packed import PackedQueue, encode_base
from pvbus.virtio.split import FAST_RING

needs_c = pytest.mark.skipif(not FAST_RING, reason="C extension not built")

BASE = 0x10000
RING = BASE  # the descriptor ring at the start of guest memory
DATA = BASE + 0x4000  # buffers after it
AVAIL, USED, WRITE = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE
FLAGS = st.sampled_from([AVAIL, USED, AVAIL | WRITE, USED | WRITE, AVAIL | USED, 0, AVAIL | 1, 4])
ADDR = st.one_of(
    st.integers(0, 0x3000).map(lambda o: DATA + o),
    st.integers(0, 0x3000).map(lambda o: DATA + o),
    st.integers(0, 2**64 - 1),
)
LENGTH = st.sampled_from([0, 2, 12, 26, 60, 76, 1526, 5000, 2**32 - 1])
#: Mostly descriptors available in the current lap (readable or writable), some anything.
KIND = st.sampled_from(["read", "read", "read", "write", "write", "write", "any"])


@st.composite
def rings(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int]], int, bytes]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    avail_wrap = draw(st.integers(0, 1))
    bits = AVAIL if avail_wrap else USED
    descs = []
    for _ in range(size):
        kind = draw(KIND)
        flags = bits if kind == "read" else bits | WRITE if kind == "write" else draw(FLAGS)
        descs.append((draw(ADDR), draw(LENGTH), draw(st.integers(0, 0xFFFF)), flags))
    base = encode_base(
        draw(st.integers(0, size - 1)),
        avail_wrap,
        draw(st.integers(0, size - 1)),
        draw(st.integers(0, 1)),
    )
    fill = draw(st.sampled_from([b"\0", b"\0\0\x01", b"\x07"]))
    return size, descs, base, fill


def _queue(
    size: int, descs: list[tuple[int, int, int, int]], base: int, fill: bytes
) -> tuple[FakeGuest, PackedQueue]:
    guest = FakeGuest(0x8000, base=BASE)
    guest.write(DATA, (fill * 0x4000)[:0x3800])
    for i, (addr, length, bid, flags) in enumerate(descs):
        guest.write(RING + 16 * i, struct.pack("<QIHH", addr, length, bid, flags))
    q = PackedQueue(size)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = RING, RING + 0x3000, RING + 0x3010
    q.set_base(base)
    q.ready = True
    return guest, q


def _python() -> contextlib.AbstractContextManager[object]:
    return mock.patch.object(packed, "_fastring", None)


def _state(guest: FakeGuest, q: PackedQueue) -> tuple[object, ...]:
    return (bytes(guest.ram), q.vring_base(), q.next_avail, q.next_used, q.used_count)


OPTIONS = st.tuples(
    st.sampled_from([0, 12]),  # skip (and the fill's prefix length)
    st.sampled_from([0, 2]),  # zero_prefix
    st.sampled_from([0, 30, 1600, 65536]),  # the batch buffer's size, the publish length
)


def _run(ring: tuple[int, list[tuple[int, int, int, int]], int, bytes], ops: list[str],
         limit: int, options: tuple[int, int, int]) -> list[object]:  # fmt: skip
    """``ops`` one after another on one queue; what each returned, then the end state."""
    skip, zero_prefix, room = options
    guest, q = _queue(*ring)
    out: list[object] = []
    for op in ops:
        if op == "views":
            views, ids = q.pop_frames(
                guest.mem, limit, skip=skip, min_len=14, max_len=1526, zero_prefix=zero_prefix
            )
            out.append(([bytes(v) for v in views], ids))
        elif op == "batch":
            batch, ids = q.pop_batch(
                guest.mem, bytearray(room), limit, skip=skip, zero_prefix=zero_prefix
            )
            out.append((batch.frames(), ids))
        elif op == "fill":
            frames = FrameBatch.of([bytes([i]) * (10 + 23 * i) for i in range(limit % 9)])
            out.append(q.fill_batch(guest.mem, frames, limit % 3, b"H" * skip))
        else:
            n = limit % (ring[0] + 1)
            q.add_used_heads(guest.mem, struct.pack(f"={n}H", *range(n)), room)
        out.append(_state(guest, q))
    return out


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    rings(),
    st.lists(st.sampled_from(["views", "batch", "fill", "publish"]), min_size=1, max_size=4),
    st.integers(0, 40),
    OPTIONS,
)
def test_c_and_python_agree_on_any_packed_ring(
    ring: tuple[int, list[tuple[int, int, int, int]], int, bytes],
    ops: list[str],
    limit: int,
    options: tuple[int, int, int],
) -> None:
    fast = _run(ring, ops, limit, options)
    with _python():
        slow = _run(ring, ops, limit, options)
    assert fast == slow


@needs_c
def test_c_refuses_bad_packed_arguments() -> None:
    from pvbus.virtio import _fastring

    with pytest.raises(ValueError):
        _fastring.packed_pop(bytes(128), 8, 8, AVAIL, 8, 0, (), 0, 0, 100, 0)  # position 8 of 8
    with pytest.raises(ValueError):
        _fastring.packed_pop(bytes(128), 8, 0, 0x1234, 8, 0, (), 0, 0, 100, 0)  # wrap bits
    with pytest.raises(ValueError):
        _fastring.packed_pop(bytes(128), 0, 0, AVAIL, 8, 0, (), 0, 0, 100, 0)  # size 0
    with pytest.raises(BufferError):  # the used side is written: a writable ring only
        _fastring.packed_publish(bytes(128), 8, 0, 0, b"\0\0", 0)
    with pytest.raises(ValueError):
        _fastring.packed_publish(bytearray(128), 8, 0, 0, b"\0", 0)  # half an id
    guest, q = _queue(2, [(DATA, 100, 0, AVAIL | WRITE), (DATA + 256, 100, 1, AVAIL | WRITE)],
                      encode_base(0, 1, 0, 1), b"\0")  # fmt: skip
    assert q.has_available(guest.mem)  # binds the ring view
    ring = (q._ring, 2, 0, AVAIL, 0, 1, guest.mem.table)
    with pytest.raises(ValueError, match="out of order"):
        _fastring.packed_fill(*ring, bytes(10), struct.pack("=II", 10, 5), 0, b"")
    with pytest.raises(ValueError, match="past the data"):
        _fastring.packed_fill(*ring, bytes(4), struct.pack("=I", 10), 0, b"")
    with pytest.raises(ValueError):
        _fastring.packed_fill(*ring, bytes(10), struct.pack("=I", 10), 2, b"")  # start past
