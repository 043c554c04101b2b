"""Public test utilities: drive any pvbus device with no socket and no VM.

:class:`FakeGuest` is guest memory on a bytearray with a bump allocator; :class:`MockDriverQueue`
is a driver-side split queue in it that builds requests from bytes and reads back what the device
wrote, :class:`MockPackedDriverQueue` its packed twin (:func:`mock_queue` picks either). Devices
are tested by handing them the device-side queue that mirrors the mock queue
(``mock.device_queue``: a :class:`~pvbus.virtio.SplitQueue` or a
:class:`~pvbus.virtio.packed.PackedQueue`). :class:`ServedDevice` serves a device
over a real vhost-user socket from a background thread, for frontend tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pvbus.testing._served import LoopThread, ServedDevice
from pvbus.virtio.driver import DriverQueue, ring_layout
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.packed import PackedQueue
from pvbus.virtio.packed_driver import PackedDriverQueue, packed_ring_layout
from pvbus.virtio.split import SplitQueue

__all__ = [
    "FakeGuest",
    "LoopThread",
    "MockDriverQueue",
    "MockPackedDriverQueue",
    "ServedDevice",
    "mock_queue",
]


class FakeGuest:
    """Guest memory backed by one bytearray region at ``base``, with a bump allocator."""

    def __init__(self, size: int = 1 << 20, base: int = 0x10000) -> None:
        self.ram = bytearray(size)
        self.base = base
        self.mem = GuestMemory([MemoryRegion.from_buffer(base, self.ram)])
        self._next = base

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes of guest memory; return the guest-physical address."""
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.base + len(self.ram):
            raise MemoryError("fake guest memory exhausted")
        self._next = addr + size
        return addr

    def put(self, data: bytes, align: int = 16) -> int:
        """Copy ``data`` into fresh guest memory; return its address."""
        addr = self.alloc(max(len(data), 1), align)
        self.write(addr, data)
        return addr

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.ram[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.base
        return bytes(self.ram[off : off + length])


class _MockRequests:
    """``send`` and ``receive`` of the mock queues, over either layout's ``add``/``get_used``."""

    guest: FakeGuest
    _writable: dict[int, list[tuple[int, int]]]

    if TYPE_CHECKING:  # what the driver queue class beside it provides

        def add(
            self,
            readable: Sequence[tuple[int, int]],
            writable: Sequence[tuple[int, int]] = (),
            *,
            indirect: tuple[memoryview, int] | None = None,
        ) -> int: ...

        def publish(self) -> bool: ...

        def get_used(self) -> list[tuple[int, int]]: ...

    def send(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Make a request of device-readable byte strings and device-writable buffer sizes."""
        rd = [(self.guest.put(b), len(b)) for b in readable]
        wr = [(self.guest.alloc(max(n, 1)), n) for n in writable]
        table = None
        if indirect:
            gpa = self.guest.alloc(16 * (len(rd) + len(wr)))
            table = (self.guest.mem.translate(gpa, 16 * (len(rd) + len(wr))), gpa)
        head = self.add(rd, wr, indirect=table)
        self._writable[head] = wr
        if publish:
            self.publish()
        return head

    def receive(self) -> list[tuple[int, int, list[bytes]]]:
        """(head, written length, contents of each writable buffer) of each used chain."""
        out = []
        for head, length in self.get_used():
            bufs = self._writable.pop(head, [])
            out.append((head, length, [self.guest.read(a, n) for a, n in bufs]))
        return out


class MockDriverQueue(_MockRequests, DriverQueue):
    """A split driver queue in a :class:`FakeGuest`, with its device-side twin ready to use."""

    def __init__(self, guest: FakeGuest, size: int = 256, *, event_idx: bool = False) -> None:
        desc, avail, used, span = ring_layout(size, 0)
        base = guest.alloc(span, 4096)
        DriverQueue.__init__(
            self, guest.mem, size, base + desc, base + avail, base + used, event_idx=event_idx
        )
        self.guest = guest
        self._writable = {}
        queue = SplitQueue(max_size=size)
        queue.size = size
        queue.desc_addr, queue.avail_addr, queue.used_addr = base + desc, base + avail, base + used
        queue.event_idx = event_idx
        queue.ready = True
        self.device_queue = queue


class MockPackedDriverQueue(_MockRequests, PackedDriverQueue):
    """A packed driver queue in a :class:`FakeGuest`, with its device-side twin
    (a :class:`~pvbus.virtio.packed.PackedQueue`) ready to use."""

    def __init__(self, guest: FakeGuest, size: int = 256, *, event_idx: bool = False) -> None:
        desc, driver, device, span = packed_ring_layout(size, 0)
        base = guest.alloc(span, 4096)
        PackedDriverQueue.__init__(
            self, guest.mem, size, base + desc, base + driver, base + device, event_idx=event_idx
        )
        self.guest = guest
        self._writable = {}
        queue = PackedQueue(max_size=size)
        queue.size = size
        queue.desc_addr, queue.avail_addr, queue.used_addr = (
            base + desc,
            base + driver,
            base + device,
        )
        queue.event_idx = event_idx
        queue.ready = True
        self.device_queue = queue


def mock_queue(
    guest: FakeGuest, size: int = 256, *, event_idx: bool = False, packed: bool = False
) -> MockDriverQueue | MockPackedDriverQueue:
    """A mock driver queue of either layout (tests parametrize devices over both)."""
    if packed:
        return MockPackedDriverQueue(guest, size, event_idx=event_idx)
    return MockDriverQueue(guest, size, event_idx=event_idx)
