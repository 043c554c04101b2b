"""BackendSession (sans-IO) driven message by message, with a real BlockDevice on a temp file
and memfd guest memory (vhost-user.rst "Starting and stopping rings", "Front-end message
types")."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from conftest import MakeBlk, fd_is_open, memfd
from pvbus.devices.blk import BlockDevice
from pvbus.vhost_user.backend import BACKEND_PROTOCOL_FEATURES, BackendSession
from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    VRING_NOFD_MASK,
    ConfigSpace,
    Empty,
    Flags,
    MemTable,
    Message,
    PayloadType,
    ProtocolFeature,
    Region,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
)
from pvbus.virtio.constants import F_EVENT_IDX, F_RING_PACKED, F_VERSION_1, DeviceStatus
from pvbus.virtio.driver import DriverQueue, ring_layout
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.queue import DriverRing

V = int(Flags.VERSION)
NEED = int(Flags.VERSION | Flags.NEED_REPLY)
GPA = 0x1_0000_0000
UADDR = 0x7F00_0000_0000
MEM_SIZE = 1 << 20
DATA = GPA + 0x80000  # data buffers live from here


@dataclass
class Recorder:
    """A RingListener that records what the session asked of the transport."""

    events: list[tuple[str, int, int | None]] = field(default_factory=list)
    running: dict[int, int | None] = field(default_factory=dict)

    def ring_started(self, index: int, kick_fd: int | None) -> None:
        assert index not in self.running, f"ring {index} started twice"
        self.events.append(("started", index, kick_fd))
        self.running[index] = kick_fd

    def ring_stopped(self, index: int) -> None:
        assert index in self.running, f"ring {index} stopped while not running"
        self.events.append(("stopped", index, None))
        del self.running[index]


class Harness:
    """A frontend in a test: its own mapping of the memfd, driver queues, eventfds."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.listener = Recorder()
        self.session = BackendSession(device, self.listener)
        self.memfd = memfd(MEM_SIZE)
        self.mem = GuestMemory([MemoryRegion.map_fd(self.memfd, GPA, MEM_SIZE, UADDR, 0)])
        self.next_data = DATA
        self.fds: list[int] = []
        device.interrupt = self._interrupt
        self.interrupts: list[int] = []

    def _interrupt(self, index: int) -> None:
        self.interrupts.append(index)
        fd = self.session.call_fd(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        self.session.close()
        self.mem.close()
        os.close(self.memfd)
        for fd in self.fds:
            if fd_is_open(fd):
                os.close(fd)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def send(
        self,
        request: Request,
        payload: object = None,
        fds: tuple[int, ...] = (),
        flags: int = V,
    ) -> Message | None:
        """Encode, decode as the backend would, handle; check the reply's bytes decode too."""
        msg = Message(request, payload if payload is not None else Empty(), flags, fds)  # type: ignore[arg-type]
        wire, _ = encode(msg)
        reader = MessageReader("backend")
        reader.receive_data(wire, fds)
        decoded = reader.next_message()
        assert decoded == msg
        reply = self.session.handle(decoded)
        if reply is not None:
            front = MessageReader("frontend")
            front.receive_data(*encode(reply))
            assert front.next_message() == reply
        return reply

    def get(self, request: Request, kind: PayloadType = U64, payload: object = None) -> object:
        reply = self.send(request, payload)
        assert reply is not None
        assert reply.flags == V | Flags.REPLY
        assert isinstance(reply.payload, kind)
        return reply.payload

    def get_u64(self, request: Request) -> int:
        payload = self.get(request)
        assert isinstance(payload, U64)
        return payload.value

    def set_mem_table(self) -> int:
        """SET_MEM_TABLE with a dup of the memfd; returns the fd the session now owns."""
        fd = os.dup(self.memfd)
        self.send(Request.SET_MEM_TABLE, MemTable((Region(GPA, MEM_SIZE, UADDR, 0),)), (fd,))
        return fd

    def uaddr(self, gpa: int) -> int:
        return gpa - GPA + UADDR

    def setup_ring(
        self, index: int, size: int = 8, base: int = 0, *, event_idx: bool = False
    ) -> tuple[DriverQueue, int, int]:
        """NUM, ADDR, BASE, CALL, KICK for ring ``index``; returns (driver queue, kick, call)."""
        desc, avail, used, _ = ring_layout(size, GPA + 0x10000 * (index + 1))
        drv = DriverQueue(self.mem, size, desc, avail, used, event_idx=event_idx)
        drv.avail_idx = drv.kicked_avail = drv.last_used = base
        self.send(Request.SET_VRING_NUM, VringState(index, size))
        addr = VringAddr(index, 0, self.uaddr(desc), self.uaddr(used), self.uaddr(avail))
        self.send(Request.SET_VRING_ADDR, addr)
        self.send(Request.SET_VRING_BASE, VringState(index, base))
        call, kick = self.eventfd(), self.eventfd()
        self.send(Request.SET_VRING_CALL, U64(index), (call,))
        self.send(Request.SET_VRING_KICK, U64(index), (kick,))
        return drv, kick, call

    def alloc(self, size: int) -> int:
        addr = self.next_data
        self.next_data += (size + 15) & ~15
        assert self.next_data <= GPA + MEM_SIZE
        return addr

    def blk_request(self, drv: DriverRing, rtype: int, sector: int, data: bytes, read: int) -> int:
        """Queue a virtio-blk request; returns the status byte's address."""
        header = self.alloc(16)
        self.mem.translate(header, 16)[:] = struct.pack("<IIQ", rtype, 0, sector)
        readable = [(header, 16)]
        if data:
            buf = self.alloc(len(data))
            self.mem.translate(buf, len(data))[:] = data
            readable.append((buf, len(data)))
        writable = [(self.alloc(read), read)] if read else []
        status = self.alloc(1)
        self.mem.translate(status, 1)[:] = b"\xff"
        drv.add(readable, [*writable, (status, 1)])
        drv.publish()
        return status

    def status(self, addr: int) -> int:
        return self.mem.translate(addr, 1)[0]


@pytest.fixture
def harness(make_blk: MakeBlk) -> Iterator[Harness]:
    h = Harness(make_blk(num_queues=2, queue_size=256))
    yield h
    h.close()


def negotiate(
    h: Harness, *, protocol: bool = True, reply_ack: bool = False, packed: bool = False
) -> None:
    """Ack what the backend offers, split rings unless ``packed``, then set the memory."""
    features = h.get_u64(Request.GET_FEATURES)
    if not packed:
        features &= ~(1 << F_RING_PACKED)
    if not protocol:
        features &= ~(1 << F_PROTOCOL_FEATURES)
    h.send(Request.SET_OWNER)
    h.send(Request.SET_FEATURES, U64(features))
    if protocol:
        proto = h.get_u64(Request.GET_PROTOCOL_FEATURES)
        if not reply_ack:
            proto &= ~(1 << ProtocolFeature.REPLY_ACK)
        h.send(Request.SET_PROTOCOL_FEATURES, U64(proto))
    h.set_mem_table()


# -- features ---------------------------------------------------------------------------


def test_feature_negotiation(harness: Harness) -> None:
    h = harness
    offered = h.get_u64(Request.GET_FEATURES)
    assert offered & (1 << F_PROTOCOL_FEATURES)
    assert offered & (1 << F_VERSION_1)
    assert offered == h.device.device_features() | 1 << F_PROTOCOL_FEATURES
    unoffered = next(b for b in range(64) if not offered >> b & 1)
    with pytest.raises(RemoteProtocolError, match="unoffered"):
        h.send(Request.SET_FEATURES, U64(offered | 1 << unoffered))
    h.send(Request.SET_FEATURES, U64(offered))
    assert h.session.features == offered
    assert h.device.acked_features == offered & ~(1 << F_PROTOCOL_FEATURES)
    assert all(q.event_idx for q in h.device.queues)
    h.send(Request.SET_FEATURES, U64(offered & ~(1 << F_EVENT_IDX)))
    assert not any(q.event_idx for q in h.device.queues)


def test_protocol_features(harness: Harness) -> None:
    h = harness
    offered = h.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert offered == BACKEND_PROTOCOL_FEATURES
    for feature in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG):
        assert offered & (1 << feature)
    with pytest.raises(RemoteProtocolError, match="unoffered"):
        h.send(Request.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.LOG_SHMFD))
    h.send(Request.SET_PROTOCOL_FEATURES, U64(offered))
    assert h.session.protocol_features == offered
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2
    assert h.get_u64(Request.GET_MAX_MEM_SLOTS) == 509


def test_reply_ack(harness: Harness) -> None:
    h = harness
    # Not negotiated: NEED_REPLY gets no answer.
    assert h.send(Request.SET_OWNER, flags=NEED) is None
    negotiate(h, reply_ack=True)
    reply = h.send(Request.SET_OWNER, flags=NEED)
    assert reply == Message(Request.SET_OWNER, U64(0), V | Flags.REPLY)
    assert h.send(Request.SET_OWNER) is None  # no NEED_REPLY, no ack
    # A request with a reply of its own gets only that.
    reply = h.send(Request.GET_FEATURES, flags=NEED)
    assert reply is not None
    assert reply.payload == U64(h.session.offered_features())
    fd = os.dup(h.memfd)
    table = MemTable((Region(GPA, MEM_SIZE, UADDR, 0),))
    assert h.send(Request.SET_MEM_TABLE, table, (fd,), NEED) == Message(
        Request.SET_MEM_TABLE, U64(0), V | Flags.REPLY
    )


def test_get_and_set_config(harness: Harness) -> None:
    h = harness
    negotiate(h)
    payload = h.get(Request.GET_CONFIG, ConfigSpace, ConfigSpace(0, 60, 0, bytes(60)))
    assert isinstance(payload, ConfigSpace)
    config = payload.data
    capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
    (blk_size,) = struct.unpack_from("<I", config, 20)
    writeback, num_queues = struct.unpack_from("<BxH", config, 32)
    assert capacity == 2048  # 1 MiB image
    assert size_max > 0
    assert seg_max == 254
    assert blk_size == 512
    assert writeback == 1
    assert num_queues == 2
    # A partial read at an offset; past the end reads zeroes.
    part = h.get(Request.GET_CONFIG, ConfigSpace, ConfigSpace(34, 2, 0, bytes(2)))
    assert isinstance(part, ConfigSpace)
    assert part.offset == 34
    assert part.data == b"\x02\x00"
    tail = h.get(Request.GET_CONFIG, ConfigSpace, ConfigSpace(56, 8, 0, bytes(8)))
    assert isinstance(tail, ConfigSpace)
    assert tail.data == b"\x01" + bytes(7)
    # The driver may turn off the write-back cache (VIRTIO_BLK_F_CONFIG_WCE).
    h.send(Request.SET_CONFIG, ConfigSpace(32, 1, 0, b"\x00"))
    payload = h.get(Request.GET_CONFIG, ConfigSpace, ConfigSpace(32, 1, 0, b"\x00"))
    assert isinstance(payload, ConfigSpace)
    assert payload.data == b"\x00"


# -- rings ------------------------------------------------------------------------------


def test_ring_starts_on_kick_without_protocol_features(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    drv, kick, _ = h.setup_ring(0)
    assert h.listener.events == [("started", 0, kick)]
    assert h.device.queues[0].ready
    with pytest.raises(RemoteProtocolError, match="PROTOCOL_FEATURES"):
        h.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    # Requests are served.
    status = h.blk_request(drv, 0, 0, b"", 512)
    h.device.process(0)
    assert h.status(status) == 0
    assert drv.get_used() == [(0, 513)]
    assert h.interrupts == [0]


def test_ring_enable_with_protocol_features(harness: Harness) -> None:
    h = harness
    negotiate(h)
    _, kick, _ = h.setup_ring(0)
    assert h.listener.events == []  # started, but disabled
    assert h.session.rings[0].started
    h.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert h.listener.events == [("started", 0, kick)]
    h.send(Request.SET_VRING_ENABLE, VringState(0, 1))  # again: no change
    h.send(Request.SET_VRING_ENABLE, VringState(0, 0))
    assert h.listener.events[-1] == ("stopped", 0, None)
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_ENABLE, VringState(0, 2))
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_ENABLE, VringState(2, 1))
    # Enabled before the kick: starts on the kick.
    h.send(Request.SET_VRING_ENABLE, VringState(1, 1))
    assert h.listener.running == {}
    _, kick1, _ = h.setup_ring(1)
    assert h.listener.running == {1: kick1}


def test_polled_ring_no_fd(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    desc, avail, used, _ = ring_layout(8, GPA + 0x10000)
    h.send(Request.SET_VRING_NUM, VringState(0, 8))
    h.send(Request.SET_VRING_ADDR, VringAddr(0, 0, h.uaddr(desc), h.uaddr(used), h.uaddr(avail)))
    h.send(Request.SET_VRING_KICK, U64(VRING_NOFD_MASK))
    assert h.listener.running == {0: None}
    assert h.session.rings[0].polled


def test_ring_misconfiguration_refused(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    for num in (0, 3, 512):
        with pytest.raises(RemoteProtocolError, match="vring size"):
            h.send(Request.SET_VRING_NUM, VringState(0, num))
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_NUM, VringState(2, 8))
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_ADDR, VringAddr(5, 0, 0, 0, 0))
    kick = h.eventfd()
    with pytest.raises(RemoteProtocolError, match="before SET_VRING_ADDR"):
        h.send(Request.SET_VRING_KICK, U64(0), (kick,))
    # Ring addresses outside the memory table.
    h.send(Request.SET_VRING_NUM, VringState(1, 8))
    h.send(Request.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x2000, 0x3000))
    kick = h.eventfd()
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_KICK, U64(1), (kick,))
    # An fd message for a ring that does not exist: the fd is closed.
    call = h.eventfd()
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_VRING_CALL, U64(7), (call,))
    assert not fd_is_open(call)


def test_vring_num_on_a_started_ring_refused(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    drv, _, _ = h.setup_ring(0, size=8)
    with pytest.raises(RemoteProtocolError, match="started"):
        h.send(Request.SET_VRING_NUM, VringState(0, 16))
    # The ring still works with its size.
    for _ in range(10):
        h.blk_request(drv, 0, 0, b"", 512)
        h.device.process(0)
        assert len(drv.get_used()) == 1


def test_get_vring_base_stops_and_set_vring_base_resumes(
    harness: Harness, make_blk: MakeBlk
) -> None:
    h = harness
    negotiate(h, protocol=False)
    drv, kick, _ = h.setup_ring(0, size=32, base=0xFFFD)
    for i in range(5):
        h.blk_request(drv, 1, i, bytes([i]) * 512, 0)
    h.device.process(0)
    assert len(drv.get_used()) == 5
    # Two more made available but not processed: the base is the next one to process.
    h.blk_request(drv, 1, 10, b"a" * 512, 0)
    h.blk_request(drv, 1, 11, b"b" * 512, 0)
    base = h.get(Request.GET_VRING_BASE, VringState, VringState(0, 0))
    assert base == VringState(0, (0xFFFD + 5) & 0xFFFF)
    assert h.listener.events[-1] == ("stopped", 0, None)
    assert not h.device.queues[0].ready
    assert not fd_is_open(kick)
    # A reconnecting frontend: a new session for the same device resumes at the base.
    h.session.close()
    h2 = Harness.__new__(Harness)
    h2.__dict__.update(h.__dict__)
    h2.listener = Recorder()
    h2.session = BackendSession(h.device, h2.listener)
    negotiate(h2, protocol=False)
    desc, avail, used = drv.desc_addr, drv.avail_addr, drv.used_addr
    h2.send(Request.SET_VRING_NUM, VringState(0, 32))
    h2.send(Request.SET_VRING_ADDR, VringAddr(0, 0, h.uaddr(desc), h.uaddr(used), h.uaddr(avail)))
    h2.send(Request.SET_VRING_BASE, VringState(0, base.num))
    h2.send(Request.SET_VRING_KICK, U64(VRING_NOFD_MASK))
    h.device.process(0)
    assert len(drv.get_used()) == 2
    with open(h.device.config.image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(1024) == b"a" * 512 + b"b" * 512
    assert h.device.queues[0].next_avail == (0xFFFD + 7) & 0xFFFF
    assert drv.used_idx() == (0xFFFD + 7) & 0xFFFF
    with pytest.raises(RemoteProtocolError, match="started"):
        h2.send(Request.SET_VRING_BASE, VringState(0, 0))
    h.session = h2.session


def test_reset_device_stops_rings_and_closes_fds(harness: Harness) -> None:
    h = harness
    negotiate(h)
    _, kick, call = h.setup_ring(0)
    h.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    err = h.eventfd()
    h.send(Request.SET_VRING_ERR, U64(0), (err,))
    h.send(Request.SET_STATUS, U64(0xF))
    h.send(Request.RESET_DEVICE)
    assert h.listener.running == {}
    for fd in (kick, call, err):
        assert not fd_is_open(fd)
    assert h.session.features == 0
    assert h.get_u64(Request.GET_STATUS) == 0
    assert h.device.acked_features == 0
    assert not h.device.queues[0].ready
    # Memory stays; the ring can be set up again.
    _, kick, _ = h.setup_ring(0)
    assert h.listener.running == {0: kick}


def test_close_closes_every_fd(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    table_fd = os.dup(h.memfd)
    _, kick0, call0 = h.setup_ring(0)
    _, kick1, call1 = h.setup_ring(1)
    err = h.eventfd()
    h.send(Request.SET_VRING_ERR, U64(1), (err,))
    h.send(Request.SET_MEM_TABLE, MemTable((Region(GPA, MEM_SIZE, UADDR, 0),)), (table_fd,))
    assert not fd_is_open(table_fd)  # mapped, then closed at once
    assert len(h.device.mem) == 1
    h.session.close()
    for fd in (kick0, call0, kick1, call1, err):
        assert not fd_is_open(fd)
    assert len(h.device.mem) == 0
    assert h.listener.running == {}


def test_set_mem_table_replaces_memory_and_closes_fds(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    drv, _, _ = h.setup_ring(0)
    old = h.device.mem
    h.set_mem_table()
    assert h.device.mem is not old
    assert len(old) == 0  # the old mapping is gone
    status = h.blk_request(drv, 0, 0, b"", 512)
    h.device.process(0)
    assert h.status(status) == 0
    # A table the backend cannot map: refused, fds closed, the old memory kept.
    bad = os.dup(h.memfd)
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_MEM_TABLE, MemTable((Region(0, 2 * MEM_SIZE, 0, 0),)), (bad,))
    assert not fd_is_open(bad)
    assert len(h.device.mem) == 1
    a, b = os.dup(h.memfd), os.dup(h.memfd)
    overlapping = MemTable((Region(0, 4096, 0, 0), Region(0, 4096, 1 << 30, 0)))
    with pytest.raises(RemoteProtocolError):
        h.send(Request.SET_MEM_TABLE, overlapping, (a, b))
    assert not fd_is_open(a)
    assert not fd_is_open(b)


def test_add_and_remove_memory_regions(harness: Harness) -> None:
    h = harness
    negotiate(h)
    second = memfd(8192)
    try:
        os.pwrite(second, b"second", 4096)
        fd = os.dup(second)
        region = Region(0x9000_0000, 4096, 0x5000_0000, 4096)
        h.send(Request.ADD_MEM_REG, SingleRegion(region), (fd,))
        assert not fd_is_open(fd)
        assert len(h.device.mem) == 2
        assert bytes(h.device.mem.translate(0x9000_0000, 6)) == b"second"
        assert h.device.mem.uaddr_to_gpa(0x5000_0010) == 0x9000_0010
        # Overlap: refused, fd closed.
        fd = os.dup(second)
        with pytest.raises(RemoteProtocolError):
            h.send(Request.ADD_MEM_REG, SingleRegion(region), (fd,))
        assert not fd_is_open(fd)
        # Removing a region that is not there.
        with pytest.raises(RemoteProtocolError):
            h.send(Request.REM_MEM_REG, SingleRegion(Region(0x9000_0000, 8192, 0x5000_0000, 0)))
        fd = os.dup(second)
        h.send(Request.REM_MEM_REG, SingleRegion(region), (fd,))
        assert not fd_is_open(fd)
        assert len(h.device.mem) == 1
    finally:
        os.close(second)


def test_add_mem_reg_beyond_the_slots(make_blk: MakeBlk) -> None:
    h = Harness(make_blk())
    try:
        h.session.max_mem_slots = 2
        regions = [Region(0x10_0000 * i, 4096, 0x10_0000 * i, 0) for i in range(1, 4)]
        for region in regions[:2]:
            h.send(Request.ADD_MEM_REG, SingleRegion(region), (os.dup(h.memfd),))
        fd = os.dup(h.memfd)
        with pytest.raises(RemoteProtocolError, match="slots"):
            h.send(Request.ADD_MEM_REG, SingleRegion(regions[2]), (fd,))
        assert not fd_is_open(fd)
        fds = (os.dup(h.memfd), os.dup(h.memfd), os.dup(h.memfd))
        table = MemTable(tuple(Region(0x10_0000 * i, 4096, 0x10_0000 * i, 0) for i in range(3)))
        with pytest.raises(RemoteProtocolError, match="slots"):
            h.send(Request.SET_MEM_TABLE, table, fds)
        assert not any(fd_is_open(fd) for fd in fds)
    finally:
        h.close()


def test_status_and_device_needs_reset(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    assert h.get_u64(Request.GET_STATUS) == 0
    h.send(Request.SET_STATUS, U64(0xF))
    assert h.get_u64(Request.GET_STATUS) == 0xF
    drv, _, _ = h.setup_ring(0)
    err = h.eventfd()
    h.send(Request.SET_VRING_ERR, U64(0), (err,))
    drv.push_avail(100)  # a head outside the ring
    drv.publish()
    with pytest.raises(QueueError) as info:
        h.device.process(0)
    h.session.ring_failed(0, info.value)  # what the transport does
    assert h.get_u64(Request.GET_STATUS) == 0xF | DeviceStatus.DEVICE_NEEDS_RESET
    assert h.listener.running == {}
    assert os.eventfd_read(err) == 1
    # Queue 1 is unaffected.
    drv1, _, _ = h.setup_ring(1)
    status = h.blk_request(drv1, 0, 0, b"", 512)
    h.device.process(1)
    assert h.status(status) == 0
    h.send(Request.SET_STATUS, U64(0))
    assert h.get_u64(Request.GET_STATUS) == 0
    # The driver reset the device and sets the ring up again: it works.
    drv0, _, _ = h.setup_ring(0)
    status = h.blk_request(drv0, 0, 0, b"", 512)
    h.device.process(0)
    assert h.status(status) == 0
    assert h.get_u64(Request.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET == 0


def test_unsupported_requests_close_their_fds(harness: Harness) -> None:
    h = harness
    fd = h.eventfd()
    with pytest.raises(RemoteProtocolError, match="unsupported"):
        h.send(Request.SET_BACKEND_REQ_FD, fds=(fd,))
    assert not fd_is_open(fd)


def test_event_idx_ring(harness: Harness) -> None:
    h = harness
    negotiate(h, protocol=False)
    drv, _, call = h.setup_ring(0, event_idx=True)
    assert h.device.queues[0].event_idx
    status = h.blk_request(drv, 0, 0, b"", 512)
    h.device.process(0)
    assert h.status(status) == 0
    assert os.eventfd_read(call) == 1
    # The device asked for a kick at the next index (avail_event).
    avail_event = h.mem.translate(drv.used_addr + 4 + 8 * 8, 2)
    assert int.from_bytes(avail_event, "little") == 1


def test_509_regions_by_add_mem_reg_and_the_510th_refused(make_blk: MakeBlk) -> None:
    h = Harness(make_blk())
    try:
        negotiate(h)
        assert h.get_u64(Request.GET_MAX_MEM_SLOTS) == 509
        h.send(Request.REM_MEM_REG, SingleRegion(Region(GPA, MEM_SIZE, UADDR, 0)))
        assert len(h.device.mem) == 0
        page = 4096
        for i in range(509):
            region = Region(i * 2 * page, page, 0x1000_0000 + i * page, (i % 256) * page)
            h.send(Request.ADD_MEM_REG, SingleRegion(region), (os.dup(h.memfd),))
        assert len(h.device.mem) == 509
        fd = os.dup(h.memfd)
        with pytest.raises(RemoteProtocolError, match="509"):
            h.send(Request.ADD_MEM_REG, SingleRegion(Region(1 << 40, page, 1 << 40, 0)), (fd,))
        assert not fd_is_open(fd)
        # Region 300 maps page 300 % 256 of the memfd.
        h.device.mem.translate(300 * 2 * page, 3)[:] = b"300"
        assert os.pread(h.memfd, 3, (300 % 256) * page) == b"300"
    finally:
        h.close()
