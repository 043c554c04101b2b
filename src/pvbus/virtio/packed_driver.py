"""The packed virtqueue, driver side (VIRTIO 1.2 sections 2.8.20 to 2.8.22).

The packed twin of :class:`~pvbus.virtio.driver.DriverQueue`, with the same methods: used by
the userspace frontend to drive backends over packed rings, and by :mod:`pvbus.testing` to
drive devices on a bytearray. Buffer ids are the driver's to choose (0 to size - 1 here); a
chain takes consecutive descriptors, the id in each. :meth:`add` writes a chain but its head's
flags only go out in :meth:`publish`, in ring order: like a split ring's index, publishing makes
a batch visible at once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pvbus.virtio.barrier import full_barrier
from pvbus.virtio.constants import (
    MAX_PACKED_QUEUE_SIZE,
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
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.packed import decode_base, encode_base
from pvbus.virtio.split import Buffer

__all__ = ["PackedDriverQueue", "packed_ring_layout"]

_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_ADDR_LEN_ID = struct.Struct("<QIH")  # a descriptor but its flags, which go last
_LEN_ID = struct.Struct("<IH")
_WRAP_BITS = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


def packed_ring_layout(size: int, base: int) -> tuple[int, int, int, int]:
    """Addresses (descriptor ring, driver area, device area) of a packed queue laid out from
    ``base`` (16-byte aligned), and the bytes it spans (alignments of section 2.8.10.1)."""
    desc = base
    driver = desc + 16 * size
    device = driver + 4
    return desc, driver, device, device + 4 - base


class PackedDriverQueue:
    """Driver-side state of one packed virtqueue laid out in guest memory.

    ``avail_addr`` is the driver area (Driver Event Suppression, written here) and
    ``used_addr`` the device area (Device Event Suppression, read here), the names vhost-user's
    SET_VRING_ADDR gives them. The positions and wrap counters start at 0 and 1 (2.8.1), or
    where ``base`` (a vhost-user vring base) says.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        base: int | None = None,
    ) -> None:
        if not 1 <= size <= MAX_PACKED_QUEUE_SIZE:
            raise ValueError(f"queue size {size} is not in 1..{MAX_PACKED_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 4 or used_addr % 4:
            raise ValueError("packed ring areas must be 16, 4 and 4-byte aligned")
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self._ring = mem.translate(desc_addr, 16 * size)
        driver = mem.translate(avail_addr, 4)
        device = mem.translate(used_addr, 4)
        self._ring[:] = bytes(len(self._ring))
        driver[:] = device[:] = bytes(4)
        self._ring16 = self._ring.cast("H")
        self._drv16 = driver.cast("H")
        self._dev16 = device.cast("H")
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        if base is not None:
            self.next_avail, self.avail_wrap, self.last_used, self.used_wrap = decode_base(base)
            if self.next_avail >= size or self.last_used >= size:
                raise ValueError(f"vring base {base:#x} outside a ring of {size}")
        self._free_ids = list(range(size - 1, -1, -1))
        self._ndesc: dict[int, int] = {}
        self._free = size
        #: Heads written by :meth:`add` whose flags :meth:`publish` stores: (word, flags).
        self._unpublished: list[tuple[int, int]] = []
        #: Descriptors made available since the last :meth:`publish` (for the device's event).
        self._added = 0

    @property
    def num_free(self) -> int:
        """Descriptors not in use."""
        return self._free

    def vring_base(self) -> int:
        """Where both sides start: the vring base to send with SET_VRING_BASE."""
        return encode_base(self.next_avail, self.avail_wrap, self.last_used, self.used_wrap)

    def write_desc(self, index: int, addr: int, length: int, flags: int, bid: int) -> None:
        """Write one raw descriptor, flags included (tests build malformed rings with it)."""
        _DESC.pack_into(self._ring, 16 * index, addr, length, bid, flags)

    def avail_flags(self) -> int:
        """AVAIL/USED bits of a descriptor made available at the current position."""
        return VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED

    def add(
        self,
        readable: Sequence[Buffer],
        writable: Sequence[Buffer] = (),
        *,
        indirect: tuple[memoryview, int] | None = None,
    ) -> int:
        """Write the buffers into the next free descriptors; return the buffer id.

        ``indirect`` is (view, guest address) of a table with room for all buffers: the chain
        then takes one ring descriptor (2.8.7). The chain is visible after :meth:`publish`.
        """
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if not self._free_ids:
            raise QueueError("no free buffer ids")
        if indirect is not None:
            table, table_gpa = indirect
            for i, (addr, length, flags) in enumerate(bufs):
                _DESC.pack_into(table, 16 * i, addr, length, 0, flags)
            descs = [(table_gpa, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        else:
            descs = bufs
        if len(descs) > self._free:
            raise QueueError(f"{len(descs)} buffers, {self._free} free descriptors")
        bid = self._free_ids.pop()
        ring, ring16, size = self._ring, self._ring16, self.size
        pos, wrap = self.next_avail, self.avail_wrap
        for i, (addr, length, flags) in enumerate(descs):
            flags |= VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            if i + 1 < len(descs):
                flags |= VIRTQ_DESC_F_NEXT
            _ADDR_LEN_ID.pack_into(ring, 16 * pos, addr, length, bid)
            if i == 0:
                self._unpublished.append((8 * pos + 7, flags))  # the head goes out last
            else:
                ring16[8 * pos + 7] = flags
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
        self.next_avail, self.avail_wrap = pos, wrap
        self._ndesc[bid] = len(descs)
        self._free -= len(descs)
        self._added += len(descs)
        return bid

    def publish(self) -> bool:
        """Expose the chains added since the last call, in ring order; return whether the
        device wants a kick (its Device Event Suppression structure, 2.8.10)."""
        ring16 = self._ring16
        for word, flags in self._unpublished:
            ring16[word] = flags
        self._unpublished.clear()
        moved = self._added
        self._added = 0
        full_barrier()  # the flags above before the device's event structure below
        flags = self._dev16[1] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        size = self.size
        off_wrap = self._dev16[0]
        event = (off_wrap & 0x7FFF) + (0 if off_wrap >> 15 else size)
        now = self.next_avail + (0 if self.avail_wrap else size)
        return (now - event - 1) % (2 * size) < moved

    def get_used(self) -> list[tuple[int, int]]:
        """Collect (buffer id, written length) of the buffers the device returned, freeing
        their descriptors (2.8.22)."""
        out: list[tuple[int, int]] = []
        ring, ring16, size = self._ring, self._ring16, self.size
        while self._ndesc:
            pos = self.last_used
            if ring16[8 * pos + 7] & _WRAP_BITS != (_WRAP_BITS if self.used_wrap else 0):
                break
            length, bid = _LEN_ID.unpack_from(ring, 16 * pos + 8)
            count = self._ndesc.pop(bid, None)
            if count is None:
                raise QueueError(f"device returned buffer {bid}, which is not in use")
            self._free_ids.append(bid)
            self._free += count
            pos += count
            if pos >= size:
                pos -= size
                self.used_wrap ^= 1
            self.last_used = pos
            out.append((bid, length))
        return out

    def set_interrupts(self, enable: bool) -> None:
        """Ask for used-buffer notifications or suppress them (Driver Event Suppression).

        With EVENT_IDX, enabling asks for one when the next used descriptor is written
        (DESC mode at the used position); disabling is the DISABLE flag either way.
        """
        drv16 = self._drv16
        if not enable:
            drv16[1] = RING_EVENT_FLAGS_DISABLE
            return
        if self.event_idx:
            drv16[0] = self.last_used | self.used_wrap << 15
            drv16[1] = RING_EVENT_FLAGS_DESC
        else:
            drv16[1] = RING_EVENT_FLAGS_ENABLE
        full_barrier()  # before the caller looks at the ring again
