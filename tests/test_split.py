"""The device-side split virtqueue (VIRTIO 1.2 section 2.7) driven by MockDriverQueue."""

from __future__ import annotations

import pytest

from pvbus.testing import FakeGuest, MockDriverQueue
from pvbus.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.split import SplitQueue, vring_need_event

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def setup(size: int = 8, *, event_idx: bool = False) -> tuple[FakeGuest, MockDriverQueue]:
    guest = FakeGuest(1 << 18)
    return guest, MockDriverQueue(guest, size, event_idx=event_idx)


def u16(guest: FakeGuest, gpa: int) -> int:
    return int.from_bytes(guest.read(gpa, 2), "little")


def test_chain_readable_then_writable() -> None:
    guest, drv = setup()
    head = drv.send([b"abc", b"defg"], [5, 7])
    chain = drv.device_queue.pop(guest.mem)
    assert chain is not None
    assert chain.head == head
    assert [guest.read(a, n) for a, n in chain.readable] == [b"abc", b"defg"]
    assert [n for _, n in chain.writable] == [5, 7]
    assert chain.readable_len == 7
    assert chain.writable_len == 12
    assert drv.device_queue.pop(guest.mem) is None


def test_indirect_chain() -> None:
    guest, drv = setup()
    drv.send([b"x" * 16, b"y"], [3, 1], indirect=True)
    assert drv.num_free == 7  # one ring descriptor for the whole chain
    chain = drv.device_queue.pop(guest.mem)
    assert chain is not None
    assert [guest.read(a, n) for a, n in chain.readable] == [b"x" * 16, b"y"]
    assert [n for _, n in chain.writable] == [3, 1]


def test_used_ring_returns_chains_and_lengths() -> None:
    guest, drv = setup()
    heads = [drv.send([b"r"], [4]) for _ in range(3)]
    queue = drv.device_queue
    for _ in heads:
        chain = queue.pop(guest.mem)
        assert chain is not None
        addr, _ = chain.writable[0]
        guest.write(addr, chain.head.to_bytes(4, "little"))
        queue.add_used(guest.mem, chain.head, 4)
    got = drv.receive()
    assert [(h, n) for h, n, _ in got] == [(h, 4) for h in heads]
    assert [bufs[0] for _, _, bufs in got] == [h.to_bytes(4, "little") for h in heads]
    assert drv.num_free == 8


def test_full_queue_of_descriptors_is_not_a_loop() -> None:
    guest, drv = setup(8)
    drv.send([b"a"] * 4, [1] * 4)  # 8 descriptors: exactly the table
    chain = drv.device_queue.pop(guest.mem)
    assert chain is not None
    assert len(chain.readable) == 4
    assert len(chain.writable) == 4


def test_indices_wrap_around_16_bits() -> None:
    guest, drv = setup(4)
    start = 0xFFFE
    drv.avail_idx = drv.kicked_avail = drv.last_used = start
    queue = drv.device_queue
    queue.set_base(start)
    for i in range(10):
        drv.send([bytes([i])], [1])
        chain = queue.pop(guest.mem)
        assert chain is not None
        assert guest.read(*chain.readable[0]) == bytes([i])
        queue.add_used(guest.mem, chain.head, 1)
        assert [n for _, n, _ in drv.receive()] == [1]
    assert queue.next_avail == (start + 10) & 0xFFFF
    assert drv.used_idx() == (start + 10) & 0xFFFF


def test_pending_counts_available_chains() -> None:
    guest, drv = setup()
    for _ in range(3):
        drv.send([b"a"], [1])
    assert drv.device_queue.pending(guest.mem) == 3
    drv.device_queue.pop(guest.mem)
    assert drv.device_queue.pending(guest.mem) == 2


# -- notifications ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (0, 2, 1, False),  # already passed before old
        (1, 2, 1, True),
        (5, 5, 0, False),  # not reached yet: new must pass event
        (5, 6, 0, True),
        (0xFFFF, 0, 0xFFFE, True),  # wraps around
        (0xFFFE, 0, 0xFFFF, False),
        (0xFFFF, 1, 0xFFF0, True),
        (0, 0, 0, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_event_idx_avail_event_written_by_the_device() -> None:
    guest, drv = setup(8, event_idx=True)
    queue = drv.device_queue
    avail_event_gpa = drv.used_addr + 4 + 8 * 8
    queue.set_notification(guest.mem, True)
    assert u16(guest, avail_event_gpa) == 0
    assert drv.send([b"a"], [1]) is not None
    assert drv.kicked_avail == 1
    # The device asked for a kick when index 0 is passed: the first publish kicks, ...
    drv.kicked_avail = 0
    drv.avail_idx = 0
    assert drv.publish() is False  # nothing new
    drv.avail_idx = 1
    assert drv.publish() is True
    drv.send([b"b"], [1], publish=False)
    assert drv.publish() is False  # ... the second does not until the device re-enables
    queue.pop(guest.mem)
    queue.pop(guest.mem)
    assert queue.set_notification(guest.mem, True) is False  # nothing more pending
    assert u16(guest, avail_event_gpa) == 2
    drv.send([b"c"], [1], publish=False)
    assert drv.publish() is True
    # Enabling while a chain is already pending reports it so the caller keeps going.
    assert queue.set_notification(guest.mem, True) is True


def test_event_idx_used_event_honoured() -> None:
    guest, drv = setup(8, event_idx=True)
    queue = drv.device_queue
    used_event_gpa = drv.avail_addr + 4 + 2 * 8
    for _ in range(4):
        drv.send([b"a"], [1])
    heads = []
    for _ in range(4):
        chain = queue.pop(guest.mem)
        assert chain is not None
        heads.append(chain.head)
    queue.add_used(guest.mem, heads[0], 1)
    assert queue.needs_notification(guest.mem) is True  # first signal always goes out
    guest.write(used_event_gpa, (2).to_bytes(2, "little"))  # interrupt once used idx passes 2
    queue.add_used(guest.mem, heads[1], 1)  # used idx 2: has not passed 2
    assert queue.needs_notification(guest.mem) is False
    queue.add_used(guest.mem, heads[2], 1)  # used idx 3: passes 2
    assert queue.needs_notification(guest.mem) is True
    queue.add_used(guest.mem, heads[3], 1)
    assert queue.needs_notification(guest.mem) is False
    # The driver's set_interrupts writes used_event = its last seen used index.
    drv.receive()
    drv.set_interrupts(True)
    assert u16(guest, used_event_gpa) == 4
    # The avail ring's NO_INTERRUPT flag means nothing with EVENT_IDX.
    guest.write(drv.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT.to_bytes(2, "little"))
    drv.send([b"a"], [1])
    chain = queue.pop(guest.mem)
    assert chain is not None
    queue.add_used(guest.mem, chain.head, 1)
    assert queue.needs_notification(guest.mem) is True


def test_set_base_makes_the_next_signal_unconditional() -> None:
    guest, drv = setup(8, event_idx=True)
    queue = drv.device_queue
    queue.needs_notification(guest.mem)
    guest.write(drv.avail_addr + 4 + 16, (100).to_bytes(2, "little"))
    queue.set_base(0)
    assert queue.needs_notification(guest.mem) is True


def test_no_notify_and_no_interrupt_flags_without_event_idx() -> None:
    guest, drv = setup(8)
    queue = drv.device_queue
    assert queue.set_notification(guest.mem, False) is False
    assert u16(guest, drv.used_addr) & VIRTQ_USED_F_NO_NOTIFY
    drv.send([b"a"], [1], publish=False)
    assert drv.publish() is False
    assert queue.set_notification(guest.mem, True) is True  # one is pending
    assert not u16(guest, drv.used_addr) & VIRTQ_USED_F_NO_NOTIFY
    drv.send([b"a"], [1], publish=False)
    assert drv.publish() is True
    # Interrupt suppression by the driver.
    queue.add_used(guest.mem, 0, 0)
    assert queue.needs_notification(guest.mem) is True
    drv.set_interrupts(False)
    assert u16(guest, drv.avail_addr) == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert queue.needs_notification(guest.mem) is False
    drv.set_interrupts(True)
    assert queue.needs_notification(guest.mem) is True


# -- malformed rings ----------------------------------------------------------------------


def raw(drv: MockDriverQueue, head: int) -> None:
    drv.push_avail(head)
    drv.publish()


def expect_queue_error(guest: FakeGuest, queue: SplitQueue, match: str) -> None:
    before = bytes(guest.ram)
    with pytest.raises(QueueError, match=match):
        queue.pop(guest.mem)
    assert bytes(guest.ram) == before  # a refused chain writes nothing


def test_bad_head_index() -> None:
    guest, drv = setup(8)
    raw(drv, 8)
    expect_queue_error(guest, drv.device_queue, "head 8")


def test_bad_next_index() -> None:
    guest, drv = setup(8)
    buf = guest.alloc(16)
    drv.write_desc(0, buf, 16, NEXT, 8)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "next index 8")


@pytest.mark.parametrize("chain", [[0, 0], [0, 1, 0], [3, 5, 7, 3]])
def test_loop_guard(chain: list[int]) -> None:
    guest, drv = setup(8)
    buf = guest.alloc(16)
    for i, index in enumerate(chain[:-1]):
        drv.write_desc(index, buf, 16, NEXT, chain[i + 1])
    raw(drv, chain[0])
    expect_queue_error(guest, drv.device_queue, "loop")


def test_loop_guard_in_an_indirect_table() -> None:
    guest, drv = setup(8)
    table = guest.alloc(64)
    buf = guest.alloc(16)
    for i in range(4):
        guest.write(
            table + 16 * i,
            buf.to_bytes(8, "little")
            + (16).to_bytes(4, "little")
            + NEXT.to_bytes(2, "little")
            + ((i + 1) % 4).to_bytes(2, "little"),
        )
    drv.write_desc(0, table, 64, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "loop")


def desc_bytes(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return (
        addr.to_bytes(8, "little")
        + length.to_bytes(4, "little")
        + flags.to_bytes(2, "little")
        + nxt.to_bytes(2, "little")
    )


def test_indirect_inside_indirect() -> None:
    guest, drv = setup(8)
    inner = guest.put(desc_bytes(guest.alloc(16), 16, 0, 0))
    outer = guest.put(desc_bytes(inner, 16, INDIRECT, 0))
    drv.write_desc(0, outer, 16, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "inside an indirect")


def test_indirect_next_index_outside_the_table() -> None:
    guest, drv = setup(8)
    table = guest.put(desc_bytes(guest.alloc(16), 16, NEXT, 1))
    drv.write_desc(0, table, 16, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "next index 1")


@pytest.mark.parametrize("length", [0, 8, 17, 33])
def test_indirect_table_length(length: int) -> None:
    guest, drv = setup(8)
    table = guest.put(desc_bytes(guest.alloc(16), 16, 0, 0) * 3)
    drv.write_desc(0, table, length, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "indirect table")


@pytest.mark.parametrize("addr", [0, 0x10000 - 16, 0x10000 + (1 << 18) - 16, (1 << 64) - 16])
def test_indirect_table_outside_memory(addr: int) -> None:
    guest, drv = setup(8)
    drv.write_desc(0, addr, 32, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "indirect table")


def test_readable_after_writable() -> None:
    guest, drv = setup(8)
    buf = guest.alloc(16)
    drv.write_desc(0, buf, 16, WRITE | NEXT, 1)
    drv.write_desc(1, buf, 16, 0, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "readable buffer after a writable")


def test_readable_after_writable_in_an_indirect_table() -> None:
    guest, drv = setup(8)
    buf = guest.alloc(16)
    table = guest.put(desc_bytes(buf, 16, WRITE | NEXT, 1) + desc_bytes(buf, 16, 0, 0))
    drv.write_desc(0, table, 32, INDIRECT, 0)
    raw(drv, 0)
    expect_queue_error(guest, drv.device_queue, "readable buffer after a writable")


def test_avail_index_too_far_ahead() -> None:
    guest, drv = setup(8)
    guest.write(drv.avail_addr + 2, (9).to_bytes(2, "little"))
    expect_queue_error(guest, drv.device_queue, "ahead")
    with pytest.raises(QueueError):
        drv.device_queue.pending(guest.mem)
    with pytest.raises(QueueError):
        drv.device_queue.set_notification(guest.mem, True)


@pytest.mark.parametrize("which", ["desc_addr", "avail_addr", "used_addr"])
@pytest.mark.parametrize("offset", [-16, (1 << 18) - 8, 1 << 40])
def test_ring_outside_memory(which: str, offset: int) -> None:
    guest, drv = setup(8)
    drv.send([b"a"], [1])
    queue = drv.device_queue
    setattr(queue, which, guest.base + offset)
    queue.unbind()
    before = bytes(guest.ram)
    with pytest.raises(QueueError, match="outside guest memory"):
        queue.pop(guest.mem)
    with pytest.raises(QueueError):
        queue.add_used(guest.mem, 0, 1)
    with pytest.raises(QueueError):
        queue.needs_notification(guest.mem)
    assert bytes(guest.ram) == before


@pytest.mark.parametrize("size", [0, 3, 12, 16])
def test_bad_queue_size(size: int) -> None:
    guest, drv = setup(8)
    queue = drv.device_queue
    queue.size = size
    queue.unbind()
    with pytest.raises(QueueError, match="queue size"):
        queue.pop(guest.mem)


def test_rebinds_when_memory_changes() -> None:
    guest, drv = setup(8)
    drv.send([b"one"], [1])
    queue = drv.device_queue
    chain = queue.pop(guest.mem)
    assert chain is not None
    # The same guest-physical layout in a different memory object: the queue follows it.
    copy = bytearray(guest.ram)
    other = GuestMemory([MemoryRegion.from_buffer(guest.base, copy)])
    queue.add_used(other, chain.head, 1)
    assert int.from_bytes(copy[drv.used_addr - guest.base + 2 :][:2], "little") == 1
    assert drv.used_idx() == 0  # the original memory was not touched
