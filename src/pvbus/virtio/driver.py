"""The split virtqueue, driver side (VIRTIO 1.2 sections 2.7.13 and 2.7.14).

Used by the userspace frontend to drive real backends, and by :mod:`pvbus.testing` to drive
devices on a bytearray. Like the device side it keeps only state and takes the rings' memory
from a :class:`GuestMemory`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pvbus.virtio.barrier import full_barrier
from pvbus.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import Buffer, vring_need_event

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def ring_layout(size: int, base: int) -> tuple[int, int, int, int]:
    """Addresses (desc, avail, used) of a queue laid out from ``base``, and the bytes it spans.

    Each part is aligned as section 2.7 requires (16, 2 and 4 bytes); the used ring starts on a
    4 KiB boundary like the legacy layout, which every device accepts.
    """
    desc = base
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 4095) & ~4095
    end = used + 6 + 8 * size
    return desc, avail, used, end - base


class DriverQueue:
    """Driver-side state of one split virtqueue laid out in guest memory."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
    ) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two")
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self._desc = mem.translate(desc_addr, 16 * size)
        self._avail = mem.translate(avail_addr, 6 + 2 * size)
        self._used = mem.translate(used_addr, 6 + 8 * size)
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = bytes(len(self._avail))
        self._used[:] = bytes(len(self._used))
        # Fields the device reads while the driver writes them (avail idx and flags,
        # used_event) go through a 16-bit view: one store each. ``Struct.pack_into`` zeroes its
        # target first, so a device running concurrently could read a transient 0 there.
        if avail_addr % 2:
            raise ValueError(f"available ring at odd address {avail_addr:#x}")
        self._avail16 = self._avail.cast("H")
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_avail = 0
        self._free = list(range(size - 1, -1, -1))
        self._chain_len: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Descriptors not in use."""
        return len(self._free)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Write one raw descriptor (tests use this to build malformed tables)."""
        _DESC.pack_into(self._desc, 16 * index, addr, length, flags, nxt)

    def add(
        self,
        readable: Sequence[Buffer],
        writable: Sequence[Buffer] = (),
        *,
        indirect: tuple[memoryview, int] | None = None,
    ) -> int:
        """Chain the buffers into free descriptors and make the chain available; return its head.

        ``indirect`` is (view, guest address) of a table with room for all buffers: the chain then
        takes one ring descriptor (section 2.7.5.3). The index is published by :meth:`publish`.
        """
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect is not None:
            table, table_gpa = indirect
            for i, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                _DESC.pack_into(table, 16 * i, addr, length, flags | more, i + 1 if more else 0)
            if not self._free:
                raise QueueError("no free descriptors")
            head = self._free.pop()
            self.write_desc(head, table_gpa, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self._chain_len[head] = 1
        else:
            if len(bufs) > len(self._free):
                raise QueueError(f"{len(bufs)} buffers, {len(self._free)} free descriptors")
            indices = [self._free.pop() for _ in bufs]
            for i, (addr, length, flags) in enumerate(bufs):
                more = i + 1 < len(bufs)
                self.write_desc(
                    indices[i],
                    addr,
                    length,
                    flags | (VIRTQ_DESC_F_NEXT if more else 0),
                    indices[i + 1] if more else 0,
                )
            head = indices[0]
            self._chain_len[head] = len(indices)
        self.push_avail(head)
        return head

    def push_avail(self, head: int) -> None:
        """Put ``head`` in the next available slot (not yet published)."""
        _U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Publish the available index; return whether the device wants a kick (2.7.13.4)."""
        self._avail16[1] = self.avail_idx
        old, new = self.kicked_avail, self.avail_idx
        self.kicked_avail = new
        full_barrier()  # the index above before the device's event or flags below (2.7.10)
        if self.event_idx:
            avail_event: int = _U16.unpack_from(self._used, 4 + 8 * self.size)[0]
            return vring_need_event(avail_event, new, old)
        flags: int = _U16.unpack_from(self._used, 0)[0]
        return not flags & VIRTQ_USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        """The device's used index."""
        idx: int = _U16.unpack_from(self._used, 2)[0]
        return idx

    def get_used(self) -> list[tuple[int, int]]:
        """Collect (head, written length) of the chains the device returned, freeing them."""
        out: list[tuple[int, int]] = []
        end = self.used_idx()
        while self.last_used != end:
            head, length = _USED_ELEM.unpack_from(self._used, 4 + 8 * (self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
            count = self._chain_len.pop(head, None)
            if count is None:
                raise QueueError(f"device returned unknown head {head}")
            index = head
            for _ in range(count):
                self._free.append(index)
                index = _DESC.unpack_from(self._desc, 16 * index)[3]
            out.append((head, length))
        return out

    def set_interrupts(self, enable: bool) -> None:
        """Ask for interrupts (used_event = last_used with EVENT_IDX) or suppress them.

        With EVENT_IDX, suppressing sets used_event just behind last_used: the device would
        signal only after the used index went all the way round (section 2.7.10).
        """
        if self.event_idx:
            event = self.last_used if enable else (self.last_used - 1) & 0xFFFF
            self._avail16[2 + self.size] = event  # used_event
        else:
            self._avail16[0] = 0 if enable else VIRTQ_AVAIL_F_NO_INTERRUPT
        if enable:
            full_barrier()  # before the caller looks at the used index again
