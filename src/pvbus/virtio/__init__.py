"""The virtio layer: spec constants, guest memory, virtqueues and descriptor chains.

This layer implements VIRTIO 1.2 chapter 2 (device basics) and nothing of any transport: it
imports no sockets, selectors or event loops, and knows nothing of PCI, MMIO or CCW. Queue state
is kept apart from guest memory; every queue operation takes the memory it works on.
"""

from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.packed import PackedQueue
from pvbus.virtio.queue import Virtqueue
from pvbus.virtio.split import DescriptorChain, SplitQueue

__all__ = [
    "DescriptorChain",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "PackedQueue",
    "QueueError",
    "SplitQueue",
    "Virtqueue",
]
