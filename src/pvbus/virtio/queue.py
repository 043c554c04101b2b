"""What a device needs of a virtqueue, whichever layout the driver chose (VIRTIO 1.2 2.6).

:class:`Virtqueue` is the device side, met by :class:`~pvbus.virtio.split.SplitQueue` (section
2.7) and :class:`~pvbus.virtio.packed.PackedQueue` (section 2.8): devices are written against
it and work on both. :class:`DriverRing` is the driver side, met by
:class:`~pvbus.virtio.driver.DriverQueue` and :class:`~pvbus.virtio.packed_driver.
PackedDriverQueue`, for the frontend clients and the mock queues of :mod:`pvbus.testing`.

What differs between the layouts stays with the transport: ring addresses and sizes, the vring
base of SET/GET_VRING_BASE, and inflight tracking (``attach_inflight`` takes the region format
of its own layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import Buffer, DescriptorChain, Popped


class Virtqueue(Protocol):
    """Device-side state of one virtqueue; every operation takes the memory it works on.

    ``desc_addr``, ``avail_addr`` and ``used_addr`` are the three areas of vhost-user's
    SET_VRING_ADDR: for a packed ring the descriptor ring, the driver area (driver event
    suppression) and the device area (device event suppression). ``next_avail`` and
    ``next_used`` count the chains taken and returned (free-running, 16 bits): their
    difference is what is in flight. A chain's ``head`` identifies it when it is returned
    (the head descriptor's index for a split ring, the buffer id for a packed one).
    """

    max_size: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    ready: bool
    event_idx: bool
    next_avail: int
    next_used: int

    @property
    def inflight(self) -> object | None:
        """The inflight region the queue records into, if any (vhost-user INFLIGHT_SHMFD)."""

    def reset(self) -> None:
        """Back to the state after device reset (section 2.1.2)."""

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE."""

    def validate(self) -> None:
        """Check the size and base before the queue is used; raises QueueError."""

    def unbind(self) -> None:
        """Forget the ring views (before the memory they point into is unmapped)."""

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available and the device not yet taken."""

    def has_available(self, mem: GuestMemory) -> bool:
        """Whether the driver has made a chain available that the device has not taken."""

    def want_more(self, mem: GuestMemory) -> bool:
        """Ask for a kick once the driver makes available more than it has now; ``True``
        when it already did (2.7.10, 2.8.10)."""

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains taken (nothing was returned since)."""

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or ``None`` when the ring is empty."""

    def pop_burst(self, mem: GuestMemory, limit: int, *, write: bool = False) -> list[Popped]:
        """Take up to ``limit`` chains; one-buffer chains of the direction asked for come as
        ``(head, addr, length, None)``, the others as ``(head, 0, 0, chain)``."""

    def pop_frames(
        self,
        mem: GuestMemory,
        limit: int,
        *,
        skip: int = 0,
        min_len: int = 0,
        max_len: int = 0xFFFFFFFF,
        zero_prefix: int = 0,
        write: bool = False,
    ) -> tuple[list[memoryview], bytes]:
        """Take up to ``limit`` chains while each is one plain buffer: views past ``skip``
        bytes and the heads as native uint16s (the fast lane; see SplitQueue.pop_frames)."""

    def pop_batch(
        self,
        mem: GuestMemory,
        into: bytearray,
        limit: int,
        *,
        skip: int = 0,
        min_len: int = 0,
        max_len: int = 0xFFFFFFFF,
        zero_prefix: int = 0,
    ) -> tuple[FrameBatch, bytes]:
        """What :meth:`pop_frames` takes, copied back to back into ``into``."""

    def fill_batch(
        self, mem: GuestMemory, batch: FrameBatch, start: int = 0, prefix: bytes = b""
    ) -> int:
        """Copy frames into one-buffer receive chains and return them; how many were placed."""

    def add_used_heads(self, mem: GuestMemory, heads: bytes, length: int = 0) -> None:
        """Return the chains ``heads`` (native uint16s from :meth:`pop_frames`)."""

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written."""

    def add_used_many(self, mem: GuestMemory, entries: list[tuple[int, int]]) -> None:
        """Return several chains; the driver sees them together."""

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was returned since the last one."""

    def set_notification(self, mem: GuestMemory, enable: bool) -> bool:
        """Ask for (or spare the device) kicks; with ``enable``, whether chains are waiting."""


class DriverRing(Protocol):
    """Driver-side state of one virtqueue laid out in guest memory."""

    size: int
    event_idx: bool
    desc_addr: int
    avail_addr: int
    used_addr: int

    @property
    def num_free(self) -> int:
        """Descriptors not in use."""

    def add(
        self,
        readable: Sequence[Buffer],
        writable: Sequence[Buffer] = (),
        *,
        indirect: tuple[memoryview, int] | None = None,
    ) -> int:
        """Put a chain in the ring (made visible by :meth:`publish`); return its id."""

    def publish(self) -> bool:
        """Make what was added visible; return whether the device wants a kick."""

    def get_used(self) -> list[tuple[int, int]]:
        """(id, written length) of each chain the device returned, freeing them."""

    def set_interrupts(self, enable: bool) -> None:
        """Ask for used-buffer notifications or suppress them."""


__all__ = ["DriverRing", "Virtqueue"]
