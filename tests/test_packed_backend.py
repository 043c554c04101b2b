"""The vhost-user backend with packed rings: features, SET/GET_VRING_BASE with both sides'
positions and wrap counters (vhost-user.rst "Vring descriptor indices for packed
virtqueues"), ring sizes, and inflight tracking in the QueueRegionPacked format across a
backend restart."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conftest import MakeBlk
from pvbus.vhost_user.backend import BackendSession
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import (
    U64,
    VRING_NOFD_MASK,
    Inflight,
    Request,
    VringAddr,
    VringState,
)
from pvbus.virtio.constants import F_RING_PACKED
from pvbus.virtio.inflight import packed_region_size, queue_region_size
from pvbus.virtio.packed import PackedQueue, encode_base
from pvbus.virtio.packed_driver import PackedDriverQueue, packed_ring_layout
from pvbus.virtio.split import SplitQueue
from test_backend_session import GPA, Harness, Recorder, negotiate


@pytest.fixture
def harness(make_blk: MakeBlk) -> Iterator[Harness]:
    h = Harness(make_blk(num_queues=2, queue_size=256))
    yield h
    h.close()


def packed_ring(
    h: Harness, index: int, size: int = 8, base: int | None = None
) -> PackedDriverQueue:
    """NUM, ADDR, BASE, CALL, KICK (no fd: polled) for a packed ring ``index``."""
    desc, driver, device, _ = packed_ring_layout(size, GPA + 0x10000 * (index + 1))
    drv = PackedDriverQueue(h.mem, size, desc, driver, device, base=base)
    h.send(Request.SET_VRING_NUM, VringState(index, size))
    addr = VringAddr(index, 0, h.uaddr(desc), h.uaddr(device), h.uaddr(driver))
    h.send(Request.SET_VRING_ADDR, addr)
    h.send(Request.SET_VRING_BASE, VringState(index, drv.vring_base()))
    h.send(Request.SET_VRING_CALL, U64(index), (h.eventfd(),))
    h.send(Request.SET_VRING_KICK, U64(index | VRING_NOFD_MASK))
    h.send(Request.SET_VRING_ENABLE, VringState(index, 1))
    return drv


def test_acked_packed_feature_makes_packed_queues_and_reset_undoes_it(harness: Harness) -> None:
    h = harness
    offered = h.get_u64(Request.GET_FEATURES)
    assert offered & (1 << F_RING_PACKED)
    negotiate(h, packed=True)
    assert all(isinstance(q, PackedQueue) for q in h.device.queues)
    assert all(q.event_idx for q in h.device.queues)
    h.send(Request.RESET_DEVICE)
    assert all(isinstance(q, SplitQueue) for q in h.device.queues)


def test_requests_over_a_packed_ring_and_the_area_addresses(harness: Harness) -> None:
    h = harness
    negotiate(h, packed=True)
    drv = packed_ring(h, 0, size=6)  # any size will do for a packed ring
    queue = h.device.queues[0]
    assert isinstance(queue, PackedQueue)
    assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (
        drv.desc_addr,
        drv.avail_addr,  # the driver area: Driver Event Suppression
        drv.used_addr,  # the device area: Device Event Suppression
    )
    for i in range(15):  # several laps
        status = h.blk_request(drv, 1, i, bytes([i]) * 512, 0)
        h.device.process(0)
        assert h.status(status) == 0
        assert len(drv.get_used()) == 1
    with open(h.device.config.image, "rb") as f:
        assert f.read(15 * 512) == b"".join(bytes([i]) * 512 for i in range(15))


def test_get_vring_base_returns_both_sides_and_set_vring_base_resumes(
    harness: Harness,
) -> None:
    h = harness
    negotiate(h, packed=True)
    drv = packed_ring(h, 0, size=8, base=encode_base(6, 0, 6, 0))  # in the second lap
    for i in range(3):  # three chains of three descriptors: 6..0, 1..3, 4..6 of lap 3
        h.blk_request(drv, 1, i, bytes([i]) * 512, 0)
        h.device.process(0)
        assert len(drv.get_used()) == 1
    h.blk_request(drv, 1, 10, b"a" * 512, 0)  # made available, not processed
    base = h.get(Request.GET_VRING_BASE, VringState, VringState(0, 0))
    assert isinstance(base, VringState)
    assert base.num == encode_base(7, 1, 7, 1)  # (6 + 9) % 8, the wrap counter flipped once
    assert (drv.last_used, drv.used_wrap) == (7, 1)
    # A new session for the same device resumes at that base.
    h.session.close()
    h2 = Harness.__new__(Harness)
    h2.__dict__.update(h.__dict__)
    h2.listener = Recorder()
    h2.session = BackendSession(h.device, h2.listener)
    negotiate(h2, packed=True)
    h2.send(Request.SET_VRING_NUM, VringState(0, 8))
    h2.send(
        Request.SET_VRING_ADDR,
        VringAddr(0, 0, h.uaddr(drv.desc_addr), h.uaddr(drv.used_addr), h.uaddr(drv.avail_addr)),
    )
    h2.send(Request.SET_VRING_BASE, VringState(0, base.num))
    h2.send(Request.SET_VRING_KICK, U64(VRING_NOFD_MASK))
    h.device.process(0)
    assert len(drv.get_used()) == 1
    with open(h.device.config.image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(512) == b"a" * 512
    h.session = h2.session


def test_ring_sizes_and_layout_changes(harness: Harness) -> None:
    h = harness
    negotiate(h)  # split
    with pytest.raises(RemoteProtocolError, match="power of two"):
        h.send(Request.SET_VRING_NUM, VringState(0, 6))
    negotiate(h, packed=True)
    h.send(Request.SET_VRING_NUM, VringState(0, 6))
    with pytest.raises(RemoteProtocolError, match="vring size"):
        h.send(Request.SET_VRING_NUM, VringState(0, 257))
    packed_ring(h, 0)
    features = h.session.features
    with pytest.raises(RemoteProtocolError, match="ring layout of started vrings"):
        h.send(Request.SET_FEATURES, U64(features & ~(1 << F_RING_PACKED)))
    h.send(Request.SET_FEATURES, U64(features))  # the same layout (as for dirty logging)


def test_inflight_area_in_the_packed_format_survives_a_backend_restart(
    make_blk: MakeBlk,
) -> None:
    """GET_INFLIGHT_FD after packed rings were acked sizes QueueRegionPacked; a backend that
    took two requests and completed the second dies; its successor, given the same area and
    a stale vring base, resubmits the first and the unprocessed one, each done once."""
    first = Harness(make_blk(num_queues=1, queue_size=256))
    try:
        negotiate(first, packed=True)
        reply = first.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 256))
        assert reply is not None and isinstance(reply.payload, Inflight)
        assert reply.payload.mmap_size == packed_region_size(256) != queue_region_size(256)
        (area_fd,) = reply.fds
        drv = packed_ring(first, 0, size=16)
        statuses = [first.blk_request(drv, 1, i, bytes([i + 1]) * 512, 0) for i in range(2)]
        device, mem = first.device, first.device.mem
        queue = device.queues[0]
        taken = [queue.pop(mem), queue.pop(mem)]
        assert taken[0] is not None and taken[1] is not None
        queue.add_used(mem, taken[1].head, device.execute(taken[1], mem))
        statuses.append(first.blk_request(drv, 1, 2, b"\x03" * 512, 0))
        assert [first.status(s) for s in statuses] == [0xFF, 0, 0xFF]
        done = drv.get_used()

        second = Harness(first.device)
        second.mem.close()
        os.close(second.memfd)
        second.mem, second.memfd = first.mem, first.memfd  # the same guest, a new session
        negotiate(second, packed=True)
        second.send(
            Request.SET_INFLIGHT_FD, Inflight(packed_region_size(256), 0, 1, 256), (area_fd,)
        )
        second.send(Request.SET_VRING_NUM, VringState(0, 16))
        addr = VringAddr(
            0,
            0,
            first.uaddr(drv.desc_addr),
            first.uaddr(drv.used_addr),
            first.uaddr(drv.avail_addr),
        )
        second.send(Request.SET_VRING_ADDR, addr)
        second.send(Request.SET_VRING_BASE, VringState(0, 0x8000_8000))  # lost: the start
        second.send(Request.SET_VRING_KICK, U64(VRING_NOFD_MASK))
        second.send(Request.SET_VRING_ENABLE, VringState(0, 1))
        second.device.process(0)
        assert [second.status(s) for s in statuses] == [0] * 3
        done += drv.get_used()
        assert sorted(bid for bid, _ in done) == [0, 1, 2]  # each buffer back exactly once
        assert drv.num_free == 16
        assert os.pread(first.device.fd, 3 * 512, 0) == b"\1" * 512 + b"\2" * 512 + b"\3" * 512
        # Positions went on from the region, not from the stale base.
        base = second.get(Request.GET_VRING_BASE, VringState, VringState(0, 0))
        assert isinstance(base, VringState) and base.num == drv.vring_base()
    finally:
        first.close()


def test_inflight_area_of_the_other_layout_is_not_used(harness: Harness) -> None:
    h = harness
    negotiate(h)  # split rings: the area is QueueRegionSplit
    reply = h.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 256))
    assert reply is not None
    for fd in reply.fds:
        os.close(fd)
    negotiate(h, packed=True)  # then packed rings with that area: nothing is tracked
    packed_ring(h, 0)
    assert h.device.queues[0].inflight is None
