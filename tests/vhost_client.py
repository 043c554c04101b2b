"""A small blocking vhost-user frontend for tests: the codec over a real Unix socket.

It negotiates features (with REPLY_ACK, so every request is acknowledged), shares one memfd
as guest memory, starts split rings (packed ones if asked) with kick and call eventfds and
issues virtio-blk reads and writes through :class:`~pvbus.virtio.driver.DriverQueue` (or
:class:`~pvbus.virtio.packed_driver.PackedDriverQueue`).
"""

from __future__ import annotations

import os
import select
import socket
import struct

from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    VRING_NOFD_MASK,
    AnyPayload,
    Empty,
    Flags,
    MemTable,
    Message,
    ProtocolFeature,
    Region,
    Request,
    VringAddr,
    VringState,
)
from pvbus.virtio.constants import F_EVENT_IDX, F_RING_PACKED
from pvbus.virtio.driver import DriverQueue, ring_layout
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.packed_driver import PackedDriverQueue, packed_ring_layout
from pvbus.virtio.queue import DriverRing

GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
MEM_SIZE = 4 << 20
TIMEOUT = 20.0


class BackendClosedError(ConnectionError):
    """The backend closed the connection."""


class VhostUserClient:
    """One frontend connection to a vhost-user backend at ``path``."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.reader = MessageReader("frontend")
        self.memfd = -1
        self.features = 0
        self.mem: GuestMemory | None = None
        self.queues: dict[int, tuple[DriverRing, int, int]] = {}
        self._next = GPA + 0x100000

    def close(self) -> None:
        self.sock.close()
        for _, kick, call in self.queues.values():
            if kick >= 0:
                os.close(kick)
            os.close(call)
        self.queues.clear()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages ---------------------------------------------------------------------------

    def send(
        self,
        request: Request,
        payload: AnyPayload | None = None,
        *,
        fds: tuple[int, ...] = (),
        flags: int = Flags.VERSION,
    ) -> None:
        data, _ = encode(Message(request, payload or Empty(), flags, fds))
        socket.send_fds(self.sock, [data], list(fds))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Message:
        while (msg := self.reader.next_message()) is None:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise BackendClosedError("backend closed the connection")
            self.reader.receive_data(data, fds)
        return msg

    def get(self, request: Request, payload: AnyPayload | None = None) -> AnyPayload:
        """Send a request that has a reply; return the reply's payload."""
        self.send(request, payload)
        reply = self.recv()
        assert reply.request is request
        return reply.payload

    def get_u64(self, request: Request) -> int:
        payload = self.get(request)
        assert isinstance(payload, U64)
        return payload.value

    def ack(
        self, request: Request, payload: AnyPayload | None = None, fds: tuple[int, ...] = ()
    ) -> None:
        """Send with NEED_REPLY and check the REPLY_ACK says success."""
        self.send(request, payload, fds=fds, flags=Flags.VERSION | Flags.NEED_REPLY)
        reply = self.recv()
        assert reply.request is request
        assert reply.payload == U64(0), f"{request.name} failed: {reply.payload}"

    # -- set-up -----------------------------------------------------------------------------

    def negotiate(self, *, packed: bool = False) -> int:
        """Features (packed rings only if asked), protocol features with REPLY_ACK, owner,
        memory; returns the features."""
        features = self.get_u64(Request.GET_FEATURES)
        assert features & (1 << F_PROTOCOL_FEATURES)
        if not packed:
            features &= ~(1 << F_RING_PACKED)
        assert not packed or features & (1 << F_RING_PACKED)
        self.send(Request.SET_FEATURES, U64(features))
        self.features = features
        offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert offered & (1 << ProtocolFeature.REPLY_ACK)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(offered))
        self.ack(Request.SET_OWNER)
        self.memfd = os.memfd_create("vhost-client", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = GuestMemory([MemoryRegion.map_fd(self.memfd, GPA, MEM_SIZE, UADDR, 0)])
        table = MemTable((Region(GPA, MEM_SIZE, UADDR, 0),))
        self.ack(Request.SET_MEM_TABLE, table, (self.memfd,))
        return features

    def start_queue(self, index: int, size: int = 64, *, polled: bool = False) -> DriverRing:
        """Set up and start ring ``index``; ``polled``: no kick fd, the backend polls it."""
        assert self.mem is not None
        event_idx = bool(self.features & (1 << F_EVENT_IDX))
        drv: DriverRing
        if self.features & (1 << F_RING_PACKED):
            desc, avail, used, _ = packed_ring_layout(size, GPA + 0x10000 * (index + 1))
            packed = PackedDriverQueue(self.mem, size, desc, avail, used, event_idx=event_idx)
            base = packed.vring_base()
            drv = packed
        else:
            desc, avail, used, _ = ring_layout(size, GPA + 0x10000 * (index + 1))
            drv = DriverQueue(self.mem, size, desc, avail, used, event_idx=event_idx)
            base = 0
        kick = -1 if polled else os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.queues[index] = (drv, kick, call)
        self.ack(Request.SET_VRING_NUM, VringState(index, size))
        u = UADDR - GPA
        self.ack(Request.SET_VRING_ADDR, VringAddr(index, 0, desc + u, used + u, avail + u))
        self.ack(Request.SET_VRING_BASE, VringState(index, base))
        self.ack(Request.SET_VRING_CALL, U64(index), (call,))
        if polled:
            self.ack(Request.SET_VRING_KICK, U64(index | VRING_NOFD_MASK))
        else:
            self.ack(Request.SET_VRING_KICK, U64(index), (kick,))
        self.ack(Request.SET_VRING_ENABLE, VringState(index, 1))
        return drv

    # -- virtio-blk -------------------------------------------------------------------------

    def _alloc(self, size: int) -> int:
        addr = self._next
        self._next += (size + 4095) & ~4095
        if self._next > GPA + MEM_SIZE:
            self._next = GPA + 0x100000
            return self._alloc(size)
        return addr

    def blk(
        self, rtype: int, sector: int, data: bytes = b"", read: int = 0, queue: int = 0
    ) -> tuple[int, bytes]:
        """One virtio-blk request; returns (status, bytes read)."""
        assert self.mem is not None
        drv, kick, call = self.queues[queue]
        header = self._alloc(16 + len(data))
        self.mem.translate(header, 16)[:] = struct.pack("<IIQ", rtype, 0, sector)
        readable = [(header, 16)]
        if data:
            self.mem.translate(header + 16, len(data))[:] = data
            readable.append((header + 16, len(data)))
        buf = self._alloc(read + 1)
        writable = [(buf, read), (buf + read, 1)] if read else [(buf, 1)]
        drv.add(readable, writable)
        drv.set_interrupts(True)  # with EVENT_IDX: used_event = the last used index seen
        drv.publish()
        if kick >= 0:
            os.eventfd_write(kick, 1)
        while not (used := drv.get_used()):
            sock = self.sock.fileno()
            ready, _, _ = select.select([call, sock], [], [], TIMEOUT)
            if not ready:
                raise TimeoutError("no completion from the backend")
            if call in ready:
                os.eventfd_read(call)
            elif sock in ready:
                raise BackendClosedError("backend closed the connection")
        assert len(used) == 1
        return self.mem.translate(buf + read, 1)[0], bytes(self.mem.translate(buf, read))
