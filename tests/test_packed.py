"""The packed virtqueue (VIRTIO 1.2 section 2.8), device side, driven by MockPackedDriverQueue
and by hand-written rings."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from pvbus.testing import FakeGuest, MockPackedDriverQueue
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pvbus.virtio.errors import QueueError
from pvbus.virtio.packed import PackedQueue, decode_base, encode_base
from pvbus.virtio.packed_driver import PackedDriverQueue, packed_ring_layout

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
AVAIL, USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
DESC = struct.Struct("<QIHH")


def setup(size: int = 8, *, event_idx: bool = False) -> tuple[FakeGuest, MockPackedDriverQueue]:
    guest = FakeGuest(1 << 18)
    return guest, MockPackedDriverQueue(guest, size, event_idx=event_idx)


def u16(guest: FakeGuest, gpa: int) -> int:
    return int.from_bytes(guest.read(gpa, 2), "little")


def ring_flags(guest: FakeGuest, drv: PackedDriverQueue, pos: int) -> int:
    return u16(guest, drv.desc_addr + 16 * pos + 14)


def pop(drv: MockPackedDriverQueue) -> tuple[int, list[bytes], list[int]]:
    """Pop one chain: (id, readable contents, writable lengths)."""
    chain = drv.device_queue.pop(drv.guest.mem)
    assert chain is not None
    return (
        chain.head,
        [drv.guest.read(a, n) for a, n in chain.readable],
        [n for _, n in chain.writable],
    )


# -- available descriptors ------------------------------------------------------------------


def test_chain_readable_then_writable_with_its_buffer_id() -> None:
    guest, drv = setup()
    bid = drv.send([b"abc", b"defg"], [5, 7])
    assert pop(drv) == (bid, [b"abc", b"defg"], [5, 7])
    assert drv.device_queue.pop(guest.mem) is None
    # Four ring descriptors, the buffer id in each, NEXT on all but the last.
    flags = [ring_flags(guest, drv, i) for i in range(4)]
    assert flags == [AVAIL | NEXT, AVAIL | NEXT, AVAIL | NEXT | WRITE, AVAIL | WRITE]


def test_a_chain_is_invisible_until_its_head_is_published() -> None:
    guest, drv = setup()
    drv.send([b"a", b"b"], [1], publish=False)
    assert drv.device_queue.pop(guest.mem) is None
    assert drv.device_queue.pending(guest.mem) == 0
    drv.publish()
    assert drv.device_queue.pending(guest.mem) == 1
    assert pop(drv)[1] == [b"a", b"b"]


def test_indirect_chain_takes_one_ring_descriptor() -> None:
    guest, drv = setup()
    bid = drv.send([b"x" * 16, b"y"], [3, 1], indirect=True)
    assert drv.num_free == 7
    assert pop(drv) == (bid, [b"x" * 16, b"y"], [3, 1])
    drv.device_queue.add_used(guest.mem, bid, 4)
    assert drv.get_used() == [(bid, 4)]
    assert drv.num_free == 8


def test_wrap_counters_flip_over_several_laps_with_chains_across_the_end() -> None:
    """Chains of 1 to 3 descriptors through a ring of 5 for 40 rounds: every chain arrives
    intact, the used side skips exactly each chain's descriptors, and both wrap counters
    flip every lap."""
    guest, drv = setup(5)
    queue = drv.device_queue
    rng = random.Random(7)
    laps = 0
    for i in range(40):
        n = rng.randint(1, 3)
        readable = [bytes([i, k]) for k in range(n - 1)] or [bytes([i])]
        writable = [2] if n > 1 else []
        bid = drv.send(readable, writable)
        got = pop(drv)
        assert got == (bid, readable, writable)
        before = queue.used_wrap
        queue.add_used(guest.mem, bid, len(writable) * 2)
        laps += queue.used_wrap != before
        assert drv.get_used() == [(bid, len(writable) * 2)]
        assert (queue.avail_pos, queue.avail_wrap) == (drv.next_avail, drv.avail_wrap)
        assert (queue.used_pos, queue.used_wrap) == (drv.last_used, drv.used_wrap)
        assert drv.num_free == 5
    assert laps >= 8
    assert queue.next_avail == queue.next_used == 40


def test_out_of_order_completion_skips_each_buffers_own_descriptor_count() -> None:
    guest, drv = setup(8)
    queue = drv.device_queue
    ids = [drv.send([b"a"] * n, [1]) for n in (2, 1, 2)]  # 3 + 2 + 3 = 8 descriptors
    assert drv.num_free == 0
    chains = [pop(drv) for _ in ids]
    assert [c[0] for c in chains] == ids
    # Completed last first: the used descriptors overwrite the first slots in that order.
    queue.add_used(guest.mem, ids[2], 1)
    assert queue.used_pos == 3
    queue.add_used(guest.mem, ids[0], 1)
    assert queue.used_pos == 6
    assert drv.get_used() == [(ids[2], 1), (ids[0], 1)]
    assert drv.num_free == 6
    queue.add_used(guest.mem, ids[1], 1)
    assert drv.get_used() == [(ids[1], 1)]
    assert (queue.used_pos, queue.used_wrap) == (0, 0)
    # The ring goes on from there, in the second lap.
    bid = drv.send([b"next"], [2])
    assert pop(drv) == (bid, [b"next"], [2])


class WordLog:
    """Stands in for a queue's 16-bit ring view and records the stores."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stores: list[int] = []

    def __getitem__(self, index: int) -> int:
        value: int = self.view[index]
        return value

    def __setitem__(self, index: int, value: int) -> None:
        self.stores.append(index)
        self.view[index] = value


def test_batch_of_used_descriptors_appears_at_once() -> None:
    """add_used_many stores the first used descriptor's flags after the others (2.8.9)."""
    guest, drv = setup(8)
    queue = drv.device_queue
    ids = [drv.send([b"a"], [4]) for _ in range(3)]
    for _ in ids:
        pop(drv)
    log = WordLog(queue._ring16)
    queue._ring16 = log  # type: ignore[assignment]
    queue.add_used_many(guest.mem, [(bid, 4) for bid in ids])
    # Two descriptors per buffer: used descriptors at 0, 2 and 4, the first one's flags last.
    assert log.stores == [8 * 2 + 7, 8 * 4 + 7, 8 * 0 + 7]
    assert [ring_flags(guest, drv, i) for i in (0, 2, 4)] == [AVAIL | USED | WRITE] * 3
    assert drv.get_used() == [(bid, 4) for bid in ids]


def test_used_descriptor_without_data_has_no_write_flag() -> None:
    guest, drv = setup()
    bid = drv.send([b"out"])
    pop(drv)
    drv.device_queue.add_used(guest.mem, bid, 0)
    assert ring_flags(guest, drv, 0) == AVAIL | USED  # 2.8.3: nothing written
    assert drv.get_used() == [(bid, 0)]


def test_pop_burst_gives_one_buffer_chains_flat_and_others_walked() -> None:
    guest, drv = setup(16)
    a = drv.send([b"one"])
    b = drv.send([b"two", b"three"])
    c = drv.send([], [8])
    d = drv.send([b"four"])
    burst = drv.device_queue.pop_burst(guest.mem, 10)
    assert [entry[0] for entry in burst] == [a, b, c, d]
    assert burst[0][3] is None and guest.read(burst[0][1], burst[0][2]) == b"one"
    assert burst[1][3] is not None and burst[1][1:3] == (0, 0)
    assert burst[2][3] is not None and burst[2][3].writable[0][1] == 8  # wrong direction
    assert burst[3][3] is None
    writes = drv.device_queue
    e = drv.send([], [6])
    (entry,) = writes.pop_burst(guest.mem, 10, write=True)
    assert entry[0] == e and entry[2] == 6 and entry[3] is None


def test_pop_burst_stops_before_a_malformed_chain_and_the_next_call_raises() -> None:
    guest, drv = setup(8)
    good = drv.send([b"ok"])
    drv.send([b"bad"], indirect=True)
    drv.write_desc(1, 0x10, 0, INDIRECT | AVAIL, 1)  # an empty indirect table
    burst = drv.device_queue.pop_burst(guest.mem, 8)
    assert [entry[0] for entry in burst] == [good]
    with pytest.raises(QueueError, match="indirect table of 0 bytes"):
        drv.device_queue.pop_burst(guest.mem, 8)


def test_pending_counts_chains_not_descriptors() -> None:
    guest, drv = setup(8)
    for n in (1, 3, 2):
        drv.send([b"x"] * n)
    assert drv.device_queue.pending(guest.mem) == 3
    pop(drv)
    assert drv.device_queue.pending(guest.mem) == 2


def test_unpop_gives_back_chains_across_the_end_of_the_ring() -> None:
    guest, drv = setup(6)
    queue = drv.device_queue
    first = drv.send([b"a"] * 3)
    pop(drv)
    queue.add_used(guest.mem, first, 0)
    drv.get_used()
    ids = [drv.send([b"b"] * 2), drv.send([b"c"]), drv.send([b"d"] * 2)]  # 3..4, 5, 0..1
    chains = [pop(drv) for _ in ids]
    state = (queue.avail_pos, queue.avail_wrap, queue.next_avail)
    assert state == (2, 0, 4)
    queue.unpop(2)
    assert (queue.avail_pos, queue.avail_wrap, queue.next_avail) == (5, 1, 2)
    assert [pop(drv) for _ in ids[1:]] == chains[1:]
    queue.unpop(3)
    assert (queue.avail_pos, queue.avail_wrap) == (3, 1)
    assert [pop(drv) for _ in ids] == chains
    assert queue.pop(guest.mem) is None


def test_zero_length_buffers_are_passed_to_the_device() -> None:
    """A zero-length element is legal in a list: the device sees it (and answers it)."""
    _, drv = setup()
    bid = drv.send([b""], [0])
    assert pop(drv) == (bid, [b""], [0])


# -- malformed rings ------------------------------------------------------------------------


def hand_ring(size: int = 4) -> tuple[FakeGuest, PackedQueue, int]:
    """A device queue over a ring written by hand: (guest, queue, ring address)."""
    guest = FakeGuest(1 << 16)
    desc, driver, device, span = packed_ring_layout(size, 0)
    base = guest.alloc(span, 4096)
    queue = PackedQueue(size)
    queue.size = size
    queue.desc_addr, queue.avail_addr, queue.used_addr = base + desc, base + driver, base + device
    return guest, queue, base + desc


def put(
    guest: FakeGuest, ring: int, pos: int, addr: int, length: int, *, flags: int, bid: int = 0
) -> None:
    guest.write(ring + 16 * pos, DESC.pack(addr, length, bid, flags))


def test_list_longer_than_the_ring_is_refused() -> None:
    guest, queue, ring = hand_ring(4)
    for pos in range(4):
        put(guest, ring, pos, guest.base, 1, flags=AVAIL | NEXT)
    with pytest.raises(QueueError, match="more than 4 descriptors"):
        queue.pop(guest.mem)


def test_list_running_into_a_descriptor_not_made_available() -> None:
    guest, queue, ring = hand_ring(4)
    put(guest, ring, 0, guest.base, 1, flags=AVAIL | NEXT)
    put(guest, ring, 1, guest.base, 1, flags=NEXT)  # never made available
    with pytest.raises(QueueError, match="descriptor 1 of its list is not available"):
        queue.pop(guest.mem)


def test_list_wrapping_must_carry_the_next_laps_flags() -> None:
    guest, queue, ring = hand_ring(4)
    queue.set_base(encode_base(3, 1, 3, 1))
    put(guest, ring, 3, guest.base, 1, flags=AVAIL | NEXT)
    put(guest, ring, 0, guest.base, 2, flags=AVAIL)  # the first lap's flags: stale
    with pytest.raises(QueueError, match="not available"):
        queue.pop(guest.mem)
    put(guest, ring, 0, guest.base, 2, flags=USED)  # the second lap's: available
    chain = queue.pop(guest.mem)
    assert chain is not None and chain.readable == [(guest.base, 1), (guest.base, 2)]
    assert (queue.avail_pos, queue.avail_wrap) == (1, 0)


@pytest.mark.parametrize(
    ("addr_off", "length", "match"),
    [
        (0, 0, "indirect table of 0 bytes"),
        (0, 24, "indirect table of 24 bytes"),
        (0, 16 * 40000, "indirect table of 40000 entries"),
        (1 << 20, 32, "indirect table: "),  # outside guest memory
    ],
)
def test_bad_indirect_tables(addr_off: int, length: int, match: str) -> None:
    guest, queue, ring = hand_ring()
    put(guest, ring, 0, guest.base + addr_off, length, flags=AVAIL | INDIRECT)
    with pytest.raises(QueueError, match=match):
        queue.pop(guest.mem)


def test_indirect_descriptor_inside_a_list_is_refused() -> None:
    guest, queue, ring = hand_ring()
    table = guest.put(DESC.pack(guest.base, 4, 0, 0))
    put(guest, ring, 0, guest.base, 1, flags=AVAIL | NEXT)
    put(guest, ring, 1, table, 16, flags=AVAIL | INDIRECT)
    with pytest.raises(QueueError, match="indirect descriptor in a list"):
        queue.pop(guest.mem)
    put(guest, ring, 0, table, 16, flags=AVAIL | INDIRECT | NEXT)
    with pytest.raises(QueueError, match="indirect descriptor in a list"):
        queue.pop(guest.mem)


def test_indirect_table_flags_other_than_write_are_ignored() -> None:
    """2.8.7: in an indirect table WRITE is the only valid flag; NEXT, INDIRECT are ignored."""
    guest, queue, ring = hand_ring()
    table = guest.put(
        DESC.pack(guest.base, 4, 9, NEXT | INDIRECT) + DESC.pack(guest.base + 8, 2, 9, WRITE | NEXT)
    )
    # WRITE on the descriptor naming the table is ignored too.
    put(guest, ring, 0, table, 32, flags=AVAIL | INDIRECT | WRITE, bid=3)
    chain = queue.pop(guest.mem)
    assert chain is not None
    assert (chain.head, chain.readable, chain.writable) == (
        3,
        [(guest.base, 4)],
        [(guest.base + 8, 2)],
    )


def test_readable_after_writable_is_refused() -> None:
    guest, queue, ring = hand_ring()
    put(guest, ring, 0, guest.base, 1, flags=AVAIL | NEXT | WRITE)
    put(guest, ring, 1, guest.base, 1, flags=AVAIL)
    with pytest.raises(QueueError, match="readable element after a writable"):
        queue.pop(guest.mem)


def test_buffers_outside_memory_are_the_devices_to_refuse() -> None:
    """The queue hands out addresses; only the device translates them (an error status)."""
    guest, queue, ring = hand_ring()
    put(guest, ring, 0, 1 << 40, 512, flags=AVAIL | WRITE, bid=2)
    chain = queue.pop(guest.mem)
    assert chain is not None and chain.writable == [(1 << 40, 512)]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("desc_addr", 1 << 30, "ring outside guest memory"),
        ("used_addr", (1 << 30) + 4, "ring outside guest memory"),
        ("desc_addr", 0x10008, "not 16-byte aligned"),
        ("avail_addr", 0x10002, "not 4-byte aligned"),
        ("size", 5000, "bad queue size"),
        ("size", 0, "bad queue size"),
    ],
)
def test_bad_rings_are_queue_errors(field: str, value: int, match: str) -> None:
    guest, queue, _ = hand_ring()
    setattr(queue, field, value)
    with pytest.raises(QueueError, match=match):
        queue.pop(guest.mem)


def test_base_outside_the_ring_is_refused() -> None:
    guest, queue, _ = hand_ring(4)
    queue.set_base(encode_base(4, 1, 0, 1))
    with pytest.raises(QueueError, match="outside a ring of 4"):
        queue.pop(guest.mem)


def test_any_size_up_to_2_15_is_a_packed_ring() -> None:
    guest = FakeGuest(1 << 18)
    drv = MockPackedDriverQueue(guest, 7)  # not a power of two (2.8)
    for i in range(20):
        bid = drv.send([bytes([i])] * (1 + i % 3))
        assert pop(drv)[0] == bid
        drv.device_queue.add_used(guest.mem, bid, 0)
        assert drv.get_used() == [(bid, 0)]


def test_driver_refuses_an_unknown_buffer_id() -> None:
    guest, drv = setup()
    drv.send([b"a"])
    queue = drv.device_queue
    pop(drv)
    queue.add_used(guest.mem, 5, 0)  # never handed out
    with pytest.raises(QueueError, match="buffer 5"):
        drv.get_used()


# -- vring base -----------------------------------------------------------------------------


def test_vring_base_round_trip_and_the_16_bit_form() -> None:
    assert encode_base(5, 1, 3, 0) == 5 | 1 << 15 | 3 << 16
    assert decode_base(encode_base(5, 1, 3, 0)) == (5, 1, 3, 0)
    assert decode_base(0x8000 | 9) == (9, 1, 9, 1)  # only the avail half: used = avail
    _, queue, _ = hand_ring(16)
    queue.set_base(encode_base(7, 0, 2, 1))
    assert (queue.avail_pos, queue.avail_wrap, queue.used_pos, queue.used_wrap) == (7, 0, 2, 1)
    assert queue.vring_base() == encode_base(7, 0, 2, 1)
    queue.reset()
    assert queue.vring_base() == 0x8000_8000  # both sides at 0, wrap counters 1 (2.8.1)


def test_driver_and_device_resume_from_a_base() -> None:
    guest = FakeGuest(1 << 18)
    _, driver, device, span = packed_ring_layout(4, 0)
    base_gpa = guest.alloc(span, 4096)
    base = encode_base(2, 0, 2, 0)
    drv = PackedDriverQueue(guest.mem, 4, base_gpa, base_gpa + driver, base_gpa + device, base=base)
    queue = PackedQueue(4)
    queue.size = 4
    queue.desc_addr, queue.avail_addr, queue.used_addr = (
        base_gpa,
        base_gpa + driver,
        base_gpa + device,
    )
    queue.set_base(drv.vring_base())
    for i in range(6):
        bid = drv.add([(guest.put(bytes([i])), 1)])
        drv.publish()
        chain = queue.pop(guest.mem)
        assert chain is not None and guest.read(*chain.readable[0]) == bytes([i])
        queue.add_used(guest.mem, bid, 0)
        assert drv.get_used() == [(bid, 0)]


# -- fast lanes -----------------------------------------------------------------------------


def test_pop_frames_takes_plain_buffers_and_stops_at_anything_else() -> None:
    guest, drv = setup(8)
    ids = [drv.send([b"\0\0" + bytes([i]) * 20]) for i in range(3)]
    drv.send([b"\0\0ab", b"cd"])  # a list: stops the lane
    queue = drv.device_queue
    views, heads = queue.pop_frames(guest.mem, 8, skip=2, min_len=4, zero_prefix=2)
    assert [bytes(v) for v in views] == [bytes([i]) * 20 for i in range(3)]
    assert list(memoryview(heads).cast("H")) == ids
    queue.add_used_heads(guest.mem, heads)
    assert drv.get_used() == [(bid, 0) for bid in ids]
    assert pop(drv)[1] == [b"\0\0ab", b"cd"]


def test_pop_batch_copies_what_fits_its_buffer() -> None:
    guest, drv = setup(8)
    ids = [drv.send([b"\0\0" + bytes([i]) * 40]) for i in range(3)]
    queue = drv.device_queue
    into = bytearray(90)
    batch, heads = queue.pop_batch(guest.mem, into, 8, skip=2, zero_prefix=2)
    assert batch.data is into and batch.frames() == [b"\0" * 40, b"\1" * 40]
    assert list(memoryview(heads).cast("H")) == ids[:2]
    batch, heads = queue.pop_batch(guest.mem, into, 8, skip=2, zero_prefix=2)
    assert batch.frames() == [b"\2" * 40] and list(memoryview(heads).cast("H")) == ids[2:]


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (b"\0\0short", {"min_len": 20}),
        (b"\0\0" + b"x" * 30, {"max_len": 20}),
        (b"\1\0" + b"x" * 30, {"zero_prefix": 2}),
    ],
)
def test_pop_frames_leaves_what_does_not_fit(data: bytes, kwargs: dict[str, Any]) -> None:
    guest, drv = setup()
    drv.send([data])
    views, heads = drv.device_queue.pop_frames(guest.mem, 8, **kwargs)
    assert views == [] and heads == b""
    assert drv.device_queue.pending(guest.mem) == 1


def test_fill_batch_copies_into_one_buffer_receive_chains() -> None:
    guest, drv = setup(8)
    ids = [drv.send([], [32]) for _ in range(3)]
    drv.send([], [4, 4])  # two buffers: the lane stops there
    frames = [b"a" * 10, b"b" * 20, b"c" * 5, b"d"]
    placed = drv.device_queue.fill_batch(guest.mem, FrameBatch.of([b"x", *frames]), 1, b"HDR")
    assert placed == 3
    got = drv.receive()
    assert [(h, n) for h, n, _ in got] == [(ids[0], 13), (ids[1], 23), (ids[2], 8)]
    assert [bufs[0][:n] for _, n, bufs in got] == [b"HDR" + f for f in frames[:3]]


# -- notifications (2.8.10) -----------------------------------------------------------------


def test_interrupts_follow_the_driver_flags_without_event_idx() -> None:
    guest, drv = setup()
    queue = drv.device_queue
    bid = drv.send([b"a"])
    pop(drv)
    queue.add_used(guest.mem, bid, 0)
    assert queue.needs_notification(guest.mem)  # ENABLE: the initial zero
    drv.set_interrupts(False)
    assert u16(guest, drv.avail_addr + 2) == RING_EVENT_FLAGS_DISABLE
    assert not queue.needs_notification(guest.mem)
    drv.set_interrupts(True)
    assert queue.needs_notification(guest.mem)


def test_kicks_follow_the_device_flags_without_event_idx() -> None:
    guest, drv = setup()
    queue = drv.device_queue
    assert queue.set_notification(guest.mem, False) is False
    assert u16(guest, drv.used_addr + 2) == RING_EVENT_FLAGS_DISABLE
    drv.send([b"a"], publish=False)
    assert drv.publish() is False
    assert queue.set_notification(guest.mem, True) is True  # a chain is already waiting
    assert u16(guest, drv.used_addr + 2) == RING_EVENT_FLAGS_ENABLE
    drv.send([b"b"], publish=False)
    assert drv.publish() is True


def test_event_idx_kicks_only_when_the_named_descriptor_is_made_available() -> None:
    guest, drv = setup(4, event_idx=True)
    queue = drv.device_queue
    assert queue.set_notification(guest.mem, True) is False
    assert u16(guest, drv.used_addr) == 0 | 1 << 15  # offset 0, wrap counter 1
    assert u16(guest, drv.used_addr + 2) == RING_EVENT_FLAGS_DESC
    drv.send([b"a"], publish=False)
    assert drv.publish() is True  # descriptor 0 of lap 1: the one named
    drv.send([b"b"], publish=False)
    assert drv.publish() is False  # passed already, nobody re-armed
    assert queue.set_notification(guest.mem, False) is False  # EVENT_IDX: nothing to write
    for _ in range(2):
        queue.add_used(guest.mem, pop(drv)[0], 0)
    drv.get_used()
    assert queue.set_notification(guest.mem, True) is False
    assert u16(guest, drv.used_addr) == 2 | 1 << 15
    drv.send([b"c", b"d", b"e"], publish=False)  # descriptors 2, 3 and 0 of the next lap
    assert drv.publish() is True


def test_event_idx_interrupts_when_the_used_side_passes_the_drivers_event() -> None:
    guest, drv = setup(4, event_idx=True)
    queue = drv.device_queue
    drv.set_interrupts(True)  # DESC at the driver's used position 0, wrap 1
    assert u16(guest, drv.avail_addr + 2) == RING_EVENT_FLAGS_DESC
    ids = [drv.send([b"x"]) for _ in range(3)]
    for _ in ids:
        pop(drv)
    queue.add_used(guest.mem, ids[0], 0)
    assert queue.needs_notification(guest.mem)  # the first signal is unconditional anyway
    queue.add_used(guest.mem, ids[1], 0)
    assert not queue.needs_notification(guest.mem)  # 0 was passed before: no new event
    drv.get_used()
    drv.set_interrupts(True)  # re-armed at position 2
    queue.add_used(guest.mem, ids[2], 0)
    assert queue.needs_notification(guest.mem)
    assert not queue.needs_notification(guest.mem)  # nothing new since


def test_event_idx_event_in_the_next_lap_is_not_passed_early() -> None:
    """An event ahead of the used side by more than the rest of the lap (Linux sets one 3/4
    of the outstanding buffers ahead) fires only when reached."""
    guest, drv = setup(4, event_idx=True)
    queue = drv.device_queue
    ids = [drv.send([b"x"]) for _ in range(4)]
    for _ in ids:
        pop(drv)
    for bid in ids[:3]:
        queue.add_used(guest.mem, bid, 0)
    assert queue.needs_notification(guest.mem)
    drv.get_used()
    # Event: descriptor 1 of the next lap (wrap 0), while the used side is at 3 of lap 1.
    drv.set_interrupts(True)
    guest.write(drv.avail_addr, (1).to_bytes(2, "little"))
    more = [drv.send([b"y"]) for _ in range(2)]  # positions 0 and 1 of lap 2
    for _ in more:
        pop(drv)
    queue.add_used(guest.mem, ids[3], 0)  # position 3: not yet
    assert not queue.needs_notification(guest.mem)
    queue.add_used(guest.mem, more[0], 0)  # position 0 of lap 2: not yet
    assert not queue.needs_notification(guest.mem)
    queue.add_used(guest.mem, more[1], 0)  # position 1 of lap 2: the event
    assert queue.needs_notification(guest.mem)


def test_event_idx_signal_after_more_than_two_laps_is_not_lost() -> None:
    """A device completing more than twice the ring between two signals (a drain of many
    short chains) still signals a driver waiting for a descriptor in between."""
    guest, drv = setup(4, event_idx=True)
    queue = drv.device_queue
    drv.set_interrupts(True)
    bid = drv.send([b"x"])
    pop(drv)
    queue.add_used(guest.mem, bid, 0)
    assert queue.needs_notification(guest.mem)
    drv.get_used()
    drv.set_interrupts(True)  # waits for descriptor 1
    for _ in range(8):  # two full laps: the event position comes round again and again
        bid = drv.send([b"x"])
        pop(drv)
        queue.add_used(guest.mem, bid, 0)
        drv.get_used()
    assert queue.used_pos == 1
    assert queue.needs_notification(guest.mem)


def test_set_base_makes_the_next_signal_unconditional() -> None:
    guest, drv = setup(4, event_idx=True)
    queue = drv.device_queue
    queue.signalled_valid = True
    queue.set_base(0x8000_8000)
    guest.write(drv.avail_addr + 2, RING_EVENT_FLAGS_DESC.to_bytes(2, "little"))
    assert queue.needs_notification(guest.mem)


def test_want_more_names_the_descriptor_after_those_available() -> None:
    guest, drv = setup(8, event_idx=True)
    queue = drv.device_queue
    drv.send([], [4])
    drv.send([], [4, 4])
    assert queue.want_more(guest.mem) is False
    assert u16(guest, drv.used_addr) == 3 | 1 << 15  # after the three descriptors there
    drv.send([], [4], publish=False)
    assert drv.publish() is True
    assert queue.want_more(guest.mem) is False  # nothing beyond it yet: the event moved on
    # Without EVENT_IDX: the ENABLE flag, and the answer whether more came meanwhile.
    guest2, plain = setup(8)
    plain.send([], [4])
    assert plain.device_queue.want_more(guest2.mem) is False
    assert u16(guest2, plain.used_addr + 2) == RING_EVENT_FLAGS_ENABLE
