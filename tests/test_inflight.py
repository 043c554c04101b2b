"""Inflight descriptor tracking (vhost-user.rst "Inflight I/O tracking") on a mock queue."""

from __future__ import annotations

import os

import pytest

from conftest import MakeBlk, fd_is_open
from pvbus.testing import FakeGuest, MockDriverQueue
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import U64, Inflight, Request, VringAddr, VringState
from pvbus.virtio.errors import QueueError
from pvbus.virtio.inflight import SplitInflight, queue_region_size
from pvbus.virtio.split import SplitQueue
from test_backend_session import Harness, negotiate

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


def test_backend_session_hands_out_and_takes_back_the_inflight_area(make_blk: MakeBlk) -> None:
    """GET_INFLIGHT_FD, a backend that dies mid-request, SET_INFLIGHT_FD in its successor."""
    first = Harness(make_blk(num_queues=1, queue_size=256))
    try:
        negotiate(first)
        reply = first.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 256))
        assert reply is not None and isinstance(reply.payload, Inflight)
        assert reply.payload.mmap_size == queue_region_size(256)
        assert reply.payload.num_queues == 1 and reply.payload.queue_size == 256
        (area_fd,) = reply.fds
        drv, _, _ = first.setup_ring(0, size=16)
        # The device takes two requests, completes the second and dies.
        statuses = [first.blk_request(drv, 1, i, bytes([i]) * 512, 0) for i in range(2)]
        device, mem = first.device, first.device.mem
        queue = device.queues[0]
        taken = [queue.pop(mem), queue.pop(mem)]
        assert taken[0] is not None and taken[1] is not None
        queue.add_used(mem, taken[1].head, device.execute(taken[1], mem))
        statuses.append(first.blk_request(drv, 1, 2, b"\x02" * 512, 0))
        assert [first.status(s) for s in statuses] == [0xFF, 0, 0xFF]
        done = drv.get_used()

        second = Harness(first.device)
        second.mem.close()
        os.close(second.memfd)
        second.mem, second.memfd = first.mem, first.memfd  # the same guest, a new session
        negotiate(second)
        second.send(
            Request.SET_INFLIGHT_FD, Inflight(queue_region_size(256), 0, 1, 256), (area_fd,)
        )
        assert not fd_is_open(area_fd)  # mapped and closed by the session
        # The same rings; the frontend lost the real base and sends the used index, 1.
        second.send(Request.SET_VRING_NUM, VringState(0, 16))
        addr = VringAddr(
            0,
            0,
            first.uaddr(drv.desc_addr),
            first.uaddr(drv.used_addr),
            first.uaddr(drv.avail_addr),
        )
        second.send(Request.SET_VRING_ADDR, addr)
        second.send(Request.SET_VRING_BASE, VringState(0, 1))
        second.send(Request.SET_VRING_CALL, U64(0), (second.eventfd(),))
        second.send(Request.SET_VRING_KICK, U64(0), (second.eventfd(),))
        second.send(Request.SET_VRING_ENABLE, VringState(0, 1))
        second.device.process(0)  # what the server does when a ring starts
        assert [second.status(s) for s in statuses] == [0] * 3
        done += drv.get_used()
        assert sorted(head for head, _ in done) == sorted({head for head, _ in done})
        assert len(done) == 3 and drv.num_free == 16  # every chain back exactly once
        data = first.device.fd
        assert os.pread(data, 3 * 512, 0) == b"\0" * 512 + b"\1" * 512 + b"\2" * 512
        with pytest.raises(RemoteProtocolError):
            second.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256))  # two queues of one
        with pytest.raises(RemoteProtocolError):
            second.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 300))  # not a power of two
    finally:
        first.close()
