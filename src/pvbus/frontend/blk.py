"""A virtio-blk driver in userspace (VIRTIO 1.2 section 5.2) over any vhost-user-blk backend.

:class:`BlockClient` reads, writes, flushes, discards and zeroes at byte offsets with no VM,
like libblkio's virtio-blk-vhost-user driver. Each request is a chain of a device-readable
header (section 5.2.6), the data, and a one-byte device-writable status; many can be in flight
per queue. The synchronous methods (:meth:`BlockClient.read` ...) do one request and wait; the
batch interface (:class:`BlockQueue`: ``submit_*``, :meth:`BlockQueue.kick`,
:meth:`BlockQueue.wait`) keeps any number in flight; :class:`AsyncBlockClient`
(:mod:`pvbus.frontend.aio`) does the same under asyncio. A request the device fails raises
:class:`BlockError` carrying the virtio status (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP).

Data goes through guest memory: either bounce buffers the client allocates and copies, or,
for zero copy, :class:`~pvbus.frontend.GuestBuffer` s from :meth:`BlockClient.alloc_buffer`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pvbus.frontend._connection import (
    DeviceClient,
    FrontendError,
    FrontendQueue,
    VhostUserFrontend,
)
from pvbus.frontend._memory import GuestBuffer, MemfdMemory
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
from pvbus.virtio.blk import (
    F_BLK_SIZE,
    F_DISCARD,
    F_FLUSH,
    F_MQ,
    F_RO,
    F_SEG_MAX,
    F_SIZE_MAX,
    F_TOPOLOGY,
    F_WRITE_ZEROES,
    HEADER,
    ID_BYTES,
    SECTOR,
    SEGMENT,
    WRITE_ZEROES_UNMAP,
    RequestType,
    Status,
)
from pvbus.virtio.constants import F_EVENT_IDX, F_VERSION_1, bit

#: The device features this driver understands.
DRIVER_FEATURES = (
    bit(F_VERSION_1)
    | bit(F_EVENT_IDX)
    | bit(F_SIZE_MAX)
    | bit(F_SEG_MAX)
    | bit(F_RO)
    | bit(F_BLK_SIZE)
    | bit(F_FLUSH)
    | bit(F_TOPOLOGY)
    | bit(F_MQ)
    | bit(F_DISCARD)
    | bit(F_WRITE_ZEROES)
)

_HEADER = HEADER
_SEGMENT = SEGMENT
_CONFIG_SIZE = 60
# One slot per request in flight: header (16 bytes), a discard/zeroes segment (16), status (1).
_SLOT = 48
_SEG_OFF = 16
_STATUS_OFF = 32
_WRITE_ZEROES_UNMAP = WRITE_ZEROES_UNMAP


class Op(IntEnum):
    """Request types (section 5.2.6), named from the driver's side."""

    READ = RequestType.IN
    WRITE = RequestType.OUT
    FLUSH = RequestType.FLUSH
    GET_ID = RequestType.GET_ID
    DISCARD = RequestType.DISCARD
    WRITE_ZEROES = RequestType.WRITE_ZEROES


class BlockError(OSError):
    """The device failed a request; ``status`` is the virtio-blk status byte."""

    def __init__(self, op: Op, offset: int, status: int) -> None:
        try:
            name = Status(status).name
        except ValueError:
            name = f"status {status}"
        super().__init__(f"virtio-blk {op.name} at {offset}: {name}")
        self.op = op
        self.offset = offset
        self.status = status


@dataclass(frozen=True, slots=True)
class BlkGeometry:
    """What the config space says (section 5.2.4); fields absent without the feature are 0."""

    capacity: int | None
    size_max: int
    seg_max: int
    block_size: int
    writeback: int
    num_queues: int

    @classmethod
    def parse(cls, config: bytes | None, features: int) -> BlkGeometry:
        if config is None:
            return cls(None, 0, 0, SECTOR, 0, 1)
        capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
        (blk_size,) = struct.unpack_from("<I", config, 20)
        writeback = config[32]
        (num_queues,) = struct.unpack_from("<H", config, 34)
        return cls(
            capacity * SECTOR,
            size_max if features & bit(F_SIZE_MAX) else 0,
            seg_max if features & bit(F_SEG_MAX) else 0,
            blk_size if features & bit(F_BLK_SIZE) and blk_size else SECTOR,
            writeback,
            num_queues if features & bit(F_MQ) and num_queues else 1,
        )


@dataclass(slots=True)
class Completion:
    """A finished request: its tag, type, status and (for bounce-buffered reads) the data."""

    tag: Any
    op: Op
    offset: int
    status: int
    length: int
    data: bytes | None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def check(self) -> Completion:
        """Raise :class:`BlockError` unless the request succeeded."""
        if self.status != Status.OK:
            raise BlockError(self.op, self.offset, self.status)
        return self


@dataclass(slots=True)
class _InFlight:
    slot: int
    op: Op
    offset: int
    length: int
    tag: Any
    bounce: GuestBuffer | None
    copy_out: bool


class QueueFullError(FrontendError):
    """No free descriptors or slots: reap completions first."""


class BlockQueue:
    """One request virtqueue of a :class:`BlockClient`: submit, kick, reap.

    ``submit_*`` put a request in the available ring without publishing it; :meth:`kick`
    publishes every submitted request at once and notifies the backend if it asked for it
    (section 2.7.13); :meth:`reap` collects what the device finished and :meth:`wait` blocks
    for at least some.
    """

    def __init__(self, client: BlockClient, fq: FrontendQueue) -> None:
        self.client = client
        self.fq = fq
        self.ring = fq.ring
        memory = client.memory
        self.memory = memory
        size = self.ring.size
        self._slots_area = memory.alloc(_SLOT * size, 64)
        self._slots_view = self._slots_area.view
        self._free_slots = list(range(size - 1, -1, -1))
        self._inflight: dict[int, _InFlight] = {}
        self._ready: deque[Completion] = deque()
        self.submitted = 0
        self.completed = 0
        size_max = client.geometry.size_max
        self._seg_size = size_max if size_max >= SECTOR else 1 << 30

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def free_descriptors(self) -> int:
        return self.ring.num_free

    def _data_descs(self, gpa: int, length: int, write: bool) -> list[tuple[int, int, bool]]:
        seg = self._seg_size
        if length <= seg:
            return [(gpa, length, write)]
        return [(gpa + o, min(seg, length - o), write) for o in range(0, length, seg)]

    def _submit(
        self,
        op: Op,
        offset: int,
        data: list[tuple[int, int, bool]],
        length: int,
        tag: Any,
        *,
        bounce: GuestBuffer | None = None,
        copy_out: bool = False,
        segment: tuple[int, int, int] | None = None,
    ) -> None:
        ring = self.ring
        if not self._free_slots or ring.num_free < len(data) + (3 if segment else 2):
            if bounce is not None:
                self.memory.free(bounce)
            raise QueueFullError(f"queue {self.fq.index} is full ({len(self._inflight)} in flight)")
        slot = self._free_slots.pop()
        base = self._slots_area.gpa + _SLOT * slot
        view = self._slots_view
        _HEADER.pack_into(view, _SLOT * slot, op, 0, offset // SECTOR)
        view[_SLOT * slot + _STATUS_OFF] = 0xFF
        readable: list[tuple[int, int]] = [(base, _HEADER.size)]
        if segment is not None:
            _SEGMENT.pack_into(view, _SLOT * slot + _SEG_OFF, *segment)
            readable.append((base + _SEG_OFF, _SEGMENT.size))
        writable: list[tuple[int, int]] = []
        if data:
            if data[0][2]:
                writable = [(a, n) for a, n, _ in data]
            else:
                readable += [(a, n) for a, n, _ in data]
        writable.append((base + _STATUS_OFF, 1))
        head = ring.add(readable, writable)
        self._inflight[head] = _InFlight(slot, op, offset, length, tag, bounce, copy_out)
        self.submitted += 1

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset % SECTOR or length % SECTOR:
            raise ValueError(f"offset {offset} and length {length} must be multiples of {SECTOR}")
        capacity = self.client.capacity
        if capacity is not None and offset + length > capacity:
            raise ValueError(f"{offset}+{length} is beyond the disk's {capacity} bytes")

    # -- submission -------------------------------------------------------------------------

    def submit_read(self, offset: int, buf: int | GuestBuffer, tag: Any = None) -> None:
        """Read into ``buf`` (zero copy), or ``buf`` bytes into a bounce buffer."""
        if isinstance(buf, GuestBuffer):
            self._check(offset, len(buf))
            self._submit(Op.READ, offset, self._data_descs(buf.gpa, len(buf), True), len(buf), tag)
            return
        self._check(offset, buf)
        if buf == 0:
            self._submit(Op.READ, offset, [], 0, tag)
            return
        bounce = self.memory.alloc(buf)
        self._submit(
            Op.READ,
            offset,
            self._data_descs(bounce.gpa, buf, True),
            buf,
            tag,
            bounce=bounce,
            copy_out=True,
        )

    def submit_write(
        self, offset: int, data: bytes | memoryview | GuestBuffer, tag: Any = None
    ) -> None:
        """Write ``data``: a guest buffer (zero copy) or bytes copied to a bounce buffer."""
        if isinstance(data, GuestBuffer):
            self._check(offset, len(data))
            self._submit(
                Op.WRITE, offset, self._data_descs(data.gpa, len(data), False), len(data), tag
            )
            return
        length = len(data)
        self._check(offset, length)
        if length == 0:
            self._submit(Op.WRITE, offset, [], 0, tag)
            return
        bounce = self.memory.alloc(length)
        bounce.view[:] = data
        self._submit(
            Op.WRITE,
            offset,
            self._data_descs(bounce.gpa, length, False),
            length,
            tag,
            bounce=bounce,
        )

    def submit_flush(self, tag: Any = None) -> None:
        """Flush the device's write cache (VIRTIO_BLK_T_FLUSH)."""
        self._submit(Op.FLUSH, 0, [], 0, tag)

    def submit_discard(self, offset: int, length: int, tag: Any = None) -> None:
        """Discard a range (VIRTIO_BLK_T_DISCARD, needs VIRTIO_BLK_F_DISCARD)."""
        self._check(offset, length)
        self._submit(
            Op.DISCARD, offset, [], length, tag, segment=(offset // SECTOR, length // SECTOR, 0)
        )

    def submit_write_zeroes(
        self, offset: int, length: int, *, unmap: bool = False, tag: Any = None
    ) -> None:
        """Zero a range (VIRTIO_BLK_T_WRITE_ZEROES, needs VIRTIO_BLK_F_WRITE_ZEROES)."""
        self._check(offset, length)
        flags = _WRITE_ZEROES_UNMAP if unmap else 0
        self._submit(
            Op.WRITE_ZEROES,
            offset,
            [],
            length,
            tag,
            segment=(offset // SECTOR, length // SECTOR, flags),
        )

    def submit_get_id(self, tag: Any = None) -> None:
        """Ask for the device's serial (VIRTIO_BLK_T_GET_ID, 20 bytes)."""
        bounce = self.memory.alloc(ID_BYTES)
        self._submit(
            Op.GET_ID,
            0,
            [(bounce.gpa, ID_BYTES, True)],
            ID_BYTES,
            tag,
            bounce=bounce,
            copy_out=True,
        )

    def kick(self) -> bool:
        """Publish what was submitted; notify the backend if it wants; return whether it did."""
        return self.fq.publish()

    # -- completion -------------------------------------------------------------------------

    def reap(self) -> list[Completion]:
        """Collect finished requests without blocking, and re-arm the interrupt (2.7.10)."""
        out: list[Completion] = list(self._ready)
        self._ready.clear()
        ring = self.ring
        inflight = self._inflight
        view = self._slots_view
        free_slots = self._free_slots
        memory = self.memory
        while True:
            used = ring.get_used()
            if not used:
                break
            for head, _ in used:
                req = inflight.pop(head)
                status = view[_SLOT * req.slot + _STATUS_OFF]
                free_slots.append(req.slot)
                data = None
                bounce = req.bounce
                if bounce is not None:
                    if req.copy_out and status == Status.OK:
                        data = bytes(bounce.view)
                    memory.free(bounce)
                out.append(Completion(req.tag, req.op, req.offset, status, req.length, data))
            # Ask for an interrupt at the next completion, then look again: the device may have
            # used more before it could see the request (section 2.7.10).
            ring.set_interrupts(True)
        self.completed += len(out)
        return out

    def wait(self, min_completions: int = 1, timeout: float | None = None) -> list[Completion]:
        """Reap until at least ``min_completions`` requests finished (or ``timeout``)."""
        out = self.reap()
        want = min(min_completions, len(out) + len(self._inflight))
        frontend = self.client.frontend
        fq = self.fq
        while len(out) < want:
            if not frontend.wait([fq], timeout):
                break
            fq.ack_calls()
            out += self.reap()
        return out

    def run(self, submit: Callable[[], None], timeout: float | None = None) -> Completion:
        """Submit one request with ``submit``, kick and wait for it (synchronous helpers)."""
        if self._inflight:
            raise FrontendError("synchronous request while batched requests are in flight")
        submit()
        self.kick()
        done = self.wait(1, timeout)
        if not done:
            raise FrontendError(f"no completion from the backend in {timeout} s")
        return done[0].check()


class BlockClient(DeviceClient):
    """A userspace virtio-blk driver on one vhost-user-blk backend socket."""

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        memory_size: int = 64 << 20,
        driver_features: int = DRIVER_FEATURES,
    ) -> None:
        if queue_size < 4 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two >= 4")
        self.frontend = frontend
        self.features = frontend.negotiate(driver_features)
        if not self.features & bit(F_VERSION_1):
            raise FrontendError("the backend does not offer VIRTIO_F_VERSION_1")
        self.geometry = BlkGeometry.parse(frontend.get_config(_CONFIG_SIZE), self.features)
        self.capacity = self.geometry.capacity
        self.block_size = self.geometry.block_size
        self.read_only = bool(self.features & bit(F_RO))
        if num_queues > 1:
            backend_queues = frontend.get_queue_num()
            most = min(self.geometry.num_queues, backend_queues or 1)
            if num_queues > most:
                raise FrontendError(f"{num_queues} queues asked, the backend has {most}")
        self.memory = MemfdMemory(memory_size)
        frontend.set_memory(self.memory)
        self.queues = [
            BlockQueue(self, frontend.start_queue(i, queue_size)) for i in range(num_queues)
        ]
        frontend.sync()

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        memory_size: int = 64 << 20,
        driver_features: int = DRIVER_FEATURES,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
        timeout: float | None = 10.0,
    ) -> BlockClient:
        """Connect to the backend listening at ``path`` and start ``num_queues`` queues."""
        return cls._open(
            path,
            connect_timeout=timeout,
            protocol_features=protocol_features,
            packed=packed,
            num_queues=num_queues,
            queue_size=queue_size,
            memory_size=memory_size,
            driver_features=driver_features,
        )

    # -- buffers ----------------------------------------------------------------------------

    def alloc_buffer(self, size: int, align: int = 4096) -> GuestBuffer:
        """A buffer in guest memory, for zero-copy ``submit_read``/``submit_write``."""
        return self.memory.alloc(size, align)

    def free_buffer(self, buf: GuestBuffer) -> None:
        self.memory.free(buf)

    # -- synchronous requests (queue 0) -----------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512)."""
        q = self.queues[0]
        done = q.run(lambda: q.submit_read(offset, length))
        return done.data or b""

    def readinto(self, offset: int, buf: GuestBuffer) -> None:
        """Read into a guest buffer with no copy."""
        q = self.queues[0]
        q.run(lambda: q.submit_read(offset, buf))

    def write(self, offset: int, data: bytes | memoryview | GuestBuffer) -> None:
        """Write ``data`` at ``offset`` (both multiples of 512)."""
        q = self.queues[0]
        q.run(lambda: q.submit_write(offset, data))

    def flush(self) -> None:
        """Make completed writes durable (VIRTIO_BLK_T_FLUSH); a no-op without F_FLUSH."""
        if not self.features & bit(F_FLUSH):
            return
        q = self.queues[0]
        q.run(q.submit_flush)

    def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset``."""
        q = self.queues[0]
        q.run(lambda: q.submit_discard(offset, length))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero ``length`` bytes at ``offset`` (``unmap``: the device may deallocate them)."""
        q = self.queues[0]
        q.run(lambda: q.submit_write_zeroes(offset, length, unmap=unmap))

    def get_id(self) -> str:
        """The device serial (VIRTIO_BLK_T_GET_ID)."""
        q = self.queues[0]
        done = q.run(q.submit_get_id)
        return (done.data or b"").split(b"\0", 1)[0].decode(errors="replace")


__all__ = [
    "DRIVER_FEATURES",
    "BlkGeometry",
    "BlockClient",
    "BlockError",
    "BlockQueue",
    "Completion",
    "Op",
    "QueueFullError",
    "Status",
]
