"""Property-based tests (hypothesis) of packed virtqueues (VIRTIO 1.2 section 2.8).

1. A model: random requests (lists and indirect tables, readable and writable buffers) through
   rings of any size, taken one by one or in bursts, sometimes given back, completed in random
   order singly or in batches. The device always sees exactly the chains the driver made, the
   driver gets back exactly the buffers the device returned, with their lengths, and both
   sides agree on where the ring stands.
2. Hostile rings: random descriptor rings, indirect tables, event structures and vring bases,
   processed by virtio-blk. Only QueueError comes out, and guest memory changes only in the
   writable buffers of chains the device accepted, the descriptor ring and the device area.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.testing import FakeGuest, MockPackedDriverQueue
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.packed import PackedQueue, encode_base
from pvbus.virtio.packed_driver import packed_ring_layout
from pvbus.virtio.split import Buffer, DescriptorChain

SETTINGS = settings(
    max_examples=int(os.environ.get("PVBUS_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- 1. the model -------------------------------------------------------------------------------

requests = st.tuples(
    st.lists(st.binary(min_size=0, max_size=40), max_size=3),  # device-readable contents
    st.lists(st.integers(0, 64), max_size=3),  # device-writable sizes
    st.booleans(),  # as an indirect table
).filter(lambda r: bool(r[0] or r[1]))

operations = st.lists(
    st.one_of(
        st.tuples(st.just("send"), requests),
        st.tuples(st.just("pop"), st.integers(1, 4)),
        st.tuples(st.just("burst"), st.integers(1, 6)),
        st.tuples(st.just("unpop"), st.integers(1, 3)),
        st.tuples(st.just("complete"), st.integers(0, 2**32)),
        st.tuples(st.just("receive"), st.just(0)),
    ),
    min_size=5,
    max_size=80,
)


@SETTINGS
@given(size=st.integers(1, 12), event_idx=st.booleans(), ops=operations)
def test_model_of_requests_through_a_packed_ring(
    size: int, event_idx: bool, ops: list[tuple[str, Any]]
) -> None:
    guest = FakeGuest(1 << 20)
    drv = MockPackedDriverQueue(guest, size, event_idx=event_idx)
    queue = drv.device_queue
    mem = guest.mem
    sent: dict[int, tuple[list[bytes], list[int]]] = {}  # made available, not yet taken
    order: list[int] = []  # ids in ring order, not yet taken
    taken: list[tuple[int, DescriptorChain]] = []  # taken, not completed
    recent = 0  # chains taken since the last completion (what unpop may give back)
    returned: dict[int, int] = {}  # completed by the device, not yet received
    for op, arg in ops:
        if op == "send":
            readable, writable, indirect = arg
            count = 1 if indirect else len(readable) + len(writable)
            if count > drv.num_free:
                continue
            bid = drv.send(readable, writable, indirect=indirect)
            assert bid not in sent and bid not in returned
            sent[bid] = (list(readable), list(writable))
            order.append(bid)
        elif op in ("pop", "burst"):
            if op == "pop":
                chains = [c for c in (queue.pop(mem) for _ in range(arg)) if c]
            else:
                burst = queue.pop_burst(mem, arg)
                chains = [
                    DescriptorChain(b, [(a, n)], []) if c is None else c for b, a, n, c in burst
                ]
            assert [c.head for c in chains] == order[:arg]
            for chain in chains:
                readable, writable = sent.pop(chain.head)
                assert [guest.read(a, n) for a, n in chain.readable] == readable
                assert [n for _, n in chain.writable] == writable
                taken.append((chain.head, chain))
                order.pop(0)
            recent += len(chains)
        elif op == "unpop":
            count = min(arg, recent)
            if not count:
                continue
            queue.unpop(count)
            back = taken[-count:]
            del taken[-count:]
            recent -= count
            for bid, chain in reversed(back):
                order.insert(0, bid)
                sent[bid] = (
                    [guest.read(a, n) for a, n in chain.readable],
                    [n for _, n in chain.writable],
                )
        elif op == "complete":
            if not taken:
                continue
            rng = random.Random(arg)
            batch = rng.sample(taken, rng.randint(1, len(taken)))
            entries = []
            for bid, chain in batch:
                length = sum(n for _, n in chain.writable)
                for a, n in chain.writable:
                    guest.write(a, bytes([bid & 0xFF]) * n)
                entries.append((bid, length))
                taken.remove((bid, chain))
                returned[bid] = length
            if rng.random() < 0.5:
                queue.add_used_many(mem, entries)
            else:
                for bid, length in entries:
                    queue.add_used(mem, bid, length)
            recent = 0
        else:
            for bid, length, bufs in drv.receive():
                assert returned.pop(bid) == length
                assert b"".join(bufs) == bytes([bid & 0xFF]) * length
        assert queue.pending(mem) == len(order)
    for bid, length, _ in drv.receive():
        assert returned.pop(bid) == length
    assert returned == {}
    if not taken and not order:  # quiescent: both sides stand at the same place
        assert (queue.used_pos, queue.used_wrap) == (drv.last_used, drv.used_wrap)
        assert (queue.avail_pos, queue.avail_wrap) == (drv.next_avail, drv.avail_wrap)
        assert drv.num_free == size


# -- 2. hostile rings ---------------------------------------------------------------------------

BASE = 0x10000
GUEST = 0x10000  # 64 KiB of guest memory
CANARY = 0x1000
SIZE = 8
RING, DRIVER, DEVICE, SPAN = packed_ring_layout(SIZE, BASE)
DATA = BASE + 0x1000
U64_MAX = (1 << 64) - 1


class RecordingQueue(PackedQueue):
    """A PackedQueue that records the writable buffers of every chain it hands the device."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.allowed: list[Buffer] = []

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        chain = super().pop(mem)
        if chain is not None:
            self.allowed.extend(chain.writable)
        return chain


addresses = st.one_of(
    st.integers(DATA, BASE + GUEST),
    st.sampled_from([0, BASE - 1, BASE + GUEST - 1, BASE + GUEST - 16, U64_MAX - 15]),
    st.integers(0, U64_MAX),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 32, 512, 513, 0xFFFF_FFFF]), st.integers(0, 0x3000)
)
wrap_flags = st.sampled_from([0x0080, 0x8000, 0x8080, 0])
kinds = st.one_of(st.integers(0, 7), st.integers(0, 0x7F7F))
descriptors = st.tuples(addresses, lengths, st.integers(0, 0xFFFF), wrap_flags, kinds)


@st.composite
def blk_request(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """A mostly well-formed virtio-blk request: header, data, status (addr, len, WRITE)."""
    header = DATA + 16 * draw(st.integers(0, 100))
    descs = [(header, 16, 0)]
    for _ in range(draw(st.integers(0, 2))):
        descs.append(
            (draw(st.integers(DATA, DATA + 0x8000)), draw(lengths), draw(st.sampled_from([0, 2])))
        )
    descs.sort(key=lambda d: d[2])
    descs.append((draw(st.integers(DATA, DATA + 0x8000)), 1, 2))
    return descs


@dataclass
class Hostile:
    """A ring as a hostile driver may leave it."""

    ring: list[tuple[int, int, int, int]]
    tables: list[tuple[int, bytes]]
    base: int
    driver_event: tuple[int, int]
    event_idx: bool
    garbage: list[tuple[int, bytes]]


@st.composite
def hostile_rings(draw: st.DrawFn) -> Hostile:
    avail_pos = draw(st.integers(0, SIZE - 1))
    avail_wrap = draw(st.integers(0, 1))
    ring: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * SIZE
    tables: list[tuple[int, bytes]] = []
    pos, wrap, used = avail_pos, avail_wrap, 0
    positions: list[int] = []  # the descriptors the requests took, to corrupt them mostly
    for bid in range(draw(st.integers(0, 4))):
        descs = draw(blk_request())
        if draw(st.booleans()):
            table_addr = DATA + 0x9000 + 0x100 * len(tables)
            table = b"".join(struct.pack("<QIHH", a, n, 0, f) for a, n, f in descs)
            tables.append((table_addr, table))
            descs = [(table_addr, len(table), 4)]
        if used + len(descs) > SIZE:
            break
        for i, (a, n, f) in enumerate(descs):
            more = 1 if i + 1 < len(descs) else 0
            bits = 0x0080 if wrap else 0x8000
            ring[pos] = (a, n, bid, f | more | bits)
            positions.append(pos)
            pos += 1
            if pos == SIZE:
                pos, wrap = 0, wrap ^ 1
        used += len(descs)
    # Corruptions: one field of a few descriptors (the kind keeps the lap's AVAIL/USED bits).
    for index, field, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from(positions) if positions else st.integers(0, SIZE - 1),
                st.integers(0, 4),
                descriptors,
            ),
            max_size=3,
        )
    ):
        addr, length, bid, flags = ring[index]
        new_addr, new_length, new_bid, bits, kind = value
        if field == 0:
            addr = new_addr
        elif field == 1:
            length = new_length
        elif field == 2:
            bid = new_bid
        elif field == 3:
            flags = flags & 0x8080 | kind
        else:
            flags = flags & 0x7F7F | bits
        ring[index] = (addr, length, bid, flags)
    tables = [
        (addr, data[:k] + draw(st.binary(max_size=16)) + data[k + 16 :])
        for addr, data in tables
        for k in [draw(st.integers(0, max(len(data) - 16, 0)))]
    ]
    return Hostile(
        ring=ring,
        tables=tables,
        base=encode_base(avail_pos, avail_wrap, avail_pos, avail_wrap),
        driver_event=(draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 3))),
        event_idx=draw(st.booleans()),
        garbage=draw(
            st.lists(
                st.tuples(st.integers(0, 100), st.binary(min_size=16, max_size=16)), max_size=4
            )
        ),
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("packed-prop") / "disk.img"
    path.write_bytes(bytes(64 * 512))
    return path


@SETTINGS
@given(s=hostile_rings())
def test_hostile_packed_rings_raise_only_queue_errors_and_write_only_where_allowed(
    image: Path, s: Hostile
) -> None:
    big = bytearray(b"\xcc" * (CANARY + GUEST + CANARY))
    memory = memoryview(big)[CANARY : CANARY + GUEST]
    memory[:] = bytes(GUEST)

    def put(gpa: int, data: bytes) -> None:
        memory[gpa - BASE : gpa - BASE + len(data)] = data

    for i, (a, n, bid, flags) in enumerate(s.ring):
        put(RING + 16 * i, struct.pack("<QIHH", a, n, bid, flags))
    for addr, data in s.tables:
        put(addr, data)
    for slot, data in s.garbage:
        put(DATA + 16 * slot, data)
    off_wrap, flags = s.driver_event
    put(DRIVER, struct.pack("<HH", off_wrap, flags))
    before = bytes(memory)
    mem = GuestMemory([MemoryRegion.from_buffer(BASE, memory)])
    device = BlockDevice(BlkConfig(str(image), queue_size=SIZE))
    device.mem = mem
    queue = RecordingQueue(SIZE)
    queue.size = SIZE
    queue.desc_addr, queue.avail_addr, queue.used_addr = RING, DRIVER, DEVICE
    queue.set_base(s.base)
    queue.event_idx = s.event_idx
    queue.ready = True
    device.queues[0] = queue
    try:
        for _ in range(2):
            device.process(0)
    except QueueError:
        pass
    finally:
        device.close()
    assert big[:CANARY] == b"\xcc" * CANARY and big[-CANARY:] == b"\xcc" * CANARY
    after = bytes(memory)
    allowed = [(RING - BASE, RING - BASE + 16 * SIZE), (DEVICE - BASE, DEVICE - BASE + 4)]
    allowed += [(a - BASE, a - BASE + n) for a, n in queue.allowed]
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        if old != new:
            assert any(lo <= i < hi for lo, hi in allowed), f"write at {BASE + i:#x}"
