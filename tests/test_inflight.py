"""Inflight descriptor tracking (vhost-user.rst "Inflight I/O tracking") on a mock queue."""

from __future__ import annotations

import pytest

from pvbus.testing import FakeGuest, MockDriverQueue
from pvbus.virtio.errors import QueueError
from pvbus.virtio.inflight import SplitInflight, queue_region_size
from pvbus.virtio.split import SplitQueue

SIZE = 8


def _twin(mock: MockDriverQueue) -> SplitQueue:
    """A new device-side queue on the same rings: what a restarted backend builds."""
    old = mock.device_queue
    queue = SplitQueue(max_size=old.max_size)
    queue.size = old.size
    queue.desc_addr, queue.avail_addr, queue.used_addr = (
        old.desc_addr,
        old.avail_addr,
        old.used_addr,
    )
    return queue


def test_region_size_is_aligned_and_holds_every_descriptor() -> None:
    for n in (1, 2, 128, 256, 1024, 32768):
        size = queue_region_size(n)
        assert size % 64 == 0
        assert size >= 16 + 16 * n


def test_fresh_region_is_initialised_and_not_recovered() -> None:
    area = bytearray(b"\xff" * queue_region_size(SIZE))
    area[8:10] = b"\0\0"  # version 0: uninitialised
    inflight = SplitInflight(memoryview(area), SIZE)
    assert inflight.recover(5) is None
    assert area[8:16] == bytes([1, 0, SIZE, 0, 0, 0, 5, 0])
    assert inflight.in_flight() == []


def test_restarted_queue_resubmits_exactly_the_unfinished_requests_in_order() -> None:
    guest = FakeGuest()
    mock = MockDriverQueue(guest, SIZE)
    area = bytearray(queue_region_size(SIZE))
    queue = mock.device_queue
    assert queue.attach_inflight(guest.mem, SplitInflight(memoryview(area), SIZE)) == 0
    heads = [mock.send([bytes([i])], [1]) for i in range(4)]
    taken = [queue.pop(guest.mem) for _ in range(3)]
    assert [c.head for c in taken if c] == heads[:3]
    queue.add_used(guest.mem, heads[1], 1)  # completed out of order
    # The backend dies here. Its successor maps the same area and the same rings.
    successor = _twin(mock)
    successor.set_base(0)  # what a frontend that lost the real base sends
    resumed = successor.attach_inflight(guest.mem, SplitInflight(memoryview(area), SIZE))
    assert resumed == 2
    again = [successor.pop(guest.mem) for _ in range(3)]
    assert [c.head for c in again if c] == [heads[0], heads[2], heads[3]]
    assert successor.pop(guest.mem) is None
    for chain in again:
        assert chain is not None
        successor.add_used(guest.mem, chain.head, 1)
    done = [head for head, _, _ in mock.receive()]
    assert sorted(done) == sorted(heads)  # every request completed exactly once
    assert len(done) == len(set(done))


def test_half_recorded_batch_is_not_resubmitted() -> None:
    """The used index reached the ring but the flags were not cleared: those are done."""
    guest = FakeGuest()
    mock = MockDriverQueue(guest, SIZE)
    area = bytearray(queue_region_size(SIZE))
    queue = mock.device_queue
    inflight = SplitInflight(memoryview(area), SIZE)
    queue.attach_inflight(guest.mem, inflight)
    heads = [mock.send([b"x"], [1]) for _ in range(3)]
    for _ in heads:
        queue.pop(guest.mem)
    queue.inflight = None  # crash between publishing the used index and clearing the flags
    for head in heads[:2]:
        inflight.pre_put(head)
    queue.add_used_many(guest.mem, [(heads[0], 1), (heads[1], 1)])
    successor = _twin(mock)
    assert successor.attach_inflight(guest.mem, SplitInflight(memoryview(area), SIZE)) == 1
    chain = successor.pop(guest.mem)
    assert chain is not None and chain.head == heads[2]
    assert successor.next_avail == 3


def test_region_for_a_smaller_queue_is_refused() -> None:
    guest = FakeGuest()
    mock = MockDriverQueue(guest, SIZE)
    area = bytearray(queue_region_size(4))
    with pytest.raises(QueueError):
        mock.device_queue.attach_inflight(guest.mem, SplitInflight(memoryview(area), 4))


def test_corrupt_batch_list_is_a_queue_error() -> None:
    guest = FakeGuest()
    mock = MockDriverQueue(guest, SIZE)
    area = bytearray(queue_region_size(SIZE))
    inflight = SplitInflight(memoryview(area), SIZE)
    mock.device_queue.attach_inflight(guest.mem, inflight)
    mock.send([b"x"], [1])
    chain = mock.device_queue.pop(guest.mem)
    assert chain is not None
    mock.device_queue.add_used(guest.mem, chain.head, 1)
    area[12:14] = (SIZE + 3).to_bytes(2, "little")  # last_batch_head out of range
    area[14:16] = b"\0\0"  # and the recorded used index behind the ring's
    with pytest.raises(QueueError):
        _twin(mock).attach_inflight(guest.mem, SplitInflight(memoryview(area), SIZE))
