"""The driver-side split queue and the public test utilities (pvbus.testing)."""

from __future__ import annotations

import pytest

from pvbus.testing import FakeGuest, MockDriverQueue
from pvbus.virtio.driver import DriverQueue, ring_layout
from pvbus.virtio.errors import GuestMemoryError, QueueError


@pytest.mark.parametrize("size", [1, 2, 256, 1024, 32768])
def test_ring_layout_alignment(size: int) -> None:
    desc, avail, used, span = ring_layout(size, 0x10000)
    assert desc == 0x10000
    assert desc % 16 == 0
    assert avail == desc + 16 * size
    assert avail % 2 == 0
    assert used % 4096 == 0
    assert used >= avail + 6 + 2 * size
    assert span == used + 6 + 8 * size - desc


def test_driver_queue_refuses_bad_sizes_and_rings_outside_memory() -> None:
    guest = FakeGuest(1 << 16)
    for size in (0, 3, 100):
        with pytest.raises(ValueError):
            DriverQueue(guest.mem, size, guest.base, guest.base + 0x1000, guest.base + 0x2000)
    with pytest.raises(GuestMemoryError):
        DriverQueue(guest.mem, 8, guest.base + (1 << 16) - 8, guest.base, guest.base + 0x1000)


def test_driver_queue_zeroes_its_rings() -> None:
    guest = FakeGuest(1 << 16)
    guest.ram[:] = b"\xff" * len(guest.ram)
    drv = MockDriverQueue(guest, 8)
    assert guest.read(drv.desc_addr, 16 * 8) == bytes(128)
    assert guest.read(drv.avail_addr, 6 + 16) == bytes(22)
    assert guest.read(drv.used_addr, 6 + 64) == bytes(70)


def test_descriptors_are_freed_on_use() -> None:
    guest = FakeGuest()
    drv = MockDriverQueue(guest, 4)
    drv.send([b"a", b"b"], [1])
    assert drv.num_free == 1
    with pytest.raises(QueueError):
        drv.send([b"a"], [1])
    drv.send([b"a"], [1], indirect=True)
    assert drv.num_free == 0
    with pytest.raises(QueueError):
        drv.send([b"a"], indirect=True)
    queue = drv.device_queue
    while (chain := queue.pop(guest.mem)) is not None:
        queue.add_used(guest.mem, chain.head, 0)
    assert len(drv.receive()) == 2
    assert drv.num_free == 4
    with pytest.raises(ValueError):
        drv.add([])


def test_unknown_used_head_is_refused() -> None:
    guest = FakeGuest()
    drv = MockDriverQueue(guest, 4)
    drv.device_queue.add_used(guest.mem, 3, 0)
    with pytest.raises(QueueError, match="unknown head 3"):
        drv.receive()


def test_publish_is_separate_from_add() -> None:
    guest = FakeGuest()
    drv = MockDriverQueue(guest, 8)
    drv.send([b"a"], [1], publish=False)
    assert drv.device_queue.pop(guest.mem) is None
    assert drv.publish() is True
    assert drv.device_queue.pop(guest.mem) is not None


def test_fake_guest_allocator() -> None:
    guest = FakeGuest(4096, base=0x8000)
    a = guest.alloc(10)
    b = guest.alloc(1, align=64)
    assert a == 0x8000
    assert b == 0x8040
    c = guest.put(b"xyz")
    assert guest.read(c, 3) == b"xyz"
    assert bytes(guest.mem.translate(c, 3)) == b"xyz"
    with pytest.raises(MemoryError):
        guest.alloc(4096)


def test_set_interrupts_off_with_event_idx_suppresses_them() -> None:
    guest = FakeGuest()
    drv = MockDriverQueue(guest, 8, event_idx=True)
    queue = drv.device_queue
    queue.needs_notification(guest.mem)  # the first signal is unconditional; now it follows
    drv.set_interrupts(False)
    for _ in range(3):
        drv.send([b"a"], [1])
        chain = queue.pop(guest.mem)
        assert chain is not None
        queue.add_used(guest.mem, chain.head, 1)
        assert queue.needs_notification(guest.mem) is False
    drv.receive()
    drv.set_interrupts(True)
    drv.send([b"a"], [1])
    chain = queue.pop(guest.mem)
    assert chain is not None
    queue.add_used(guest.mem, chain.head, 1)
    assert queue.needs_notification(guest.mem) is True
