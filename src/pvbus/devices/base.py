"""The one small interface every device model implements (VIRTIO 1.2 chapters 2 and 5).

A device knows guest memory, its virtqueues and an interrupt trigger, and nothing of the
transport that renders it (PCI, MMIO, CCW) or of vhost-user. The transport sets ``mem``,
``queues``, ``interrupt`` and ``reactor``, calls :meth:`VirtioDevice.process` when the driver
kicks a queue, and resets the device as a template method: :meth:`reset` clears the common
state and calls :meth:`reset_device` for the device's own.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import ClassVar, Protocol

from pvbus.virtio.constants import F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1, bit
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.packed import PackedQueue
from pvbus.virtio.queue import Virtqueue
from pvbus.virtio.split import SplitQueue

#: Ring features every pvbus device offers (sections 2.7.5.3, 2.7.10, 2.8, 6): indirect
#: descriptors, event index, and packed rings besides split ones.
COMMON_FEATURES = bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX) | bit(F_RING_PACKED)

#: Chains one :meth:`VirtioDevice.drain` completes before it lets other work run (the
#: transport calls the queue again right after): a driver that keeps a queue full must not
#: starve the device's other queues or the vhost-user socket (Linux vhost's "weight").
DRAIN_WEIGHT = 1024

#: Buckets of :attr:`QueueStats.latency`: bucket ``b`` counts requests whose batch (first pop
#: to last completion) took less than ``2**b`` units of 1.024 us; the last takes the rest.
LATENCY_BUCKETS = 16


class QueueStats:
    """Counters of one virtqueue, kept by the data path as plain integer increments.

    Nothing here locks or allocates per request; the bus copies the numbers into shared
    memory from time to time. Counters survive device reset.
    """

    __slots__ = ("bytes", "calls", "coalesced", "errors", "kicks", "latency", "requests")

    def __init__(self) -> None:
        #: Driver notifications (kicks, or polls of a kick-less ring) routed to the queue.
        self.kicks = 0
        #: Chains completed (returned in the used ring).
        self.requests = 0
        #: Payload bytes moved between guest memory and the backend.
        self.bytes = 0
        #: Used-buffer notifications (interrupts) sent to the driver.
        self.calls = 0
        #: Requests completed with an error status, and ring errors.
        self.errors = 0
        #: Notifications held back by an interrupt-coalescing policy.
        self.coalesced = 0
        #: Latency histogram (see :data:`LATENCY_BUCKETS`).
        self.latency = [0] * LATENCY_BUCKETS


class Reactor(Protocol):
    """The event loop a device may use for its own I/O (a tap fd, a socket, a timer)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable."""

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once after ``delay`` seconds."""


def _no_interrupt(index: int) -> None:
    """The interrupt trigger of a device no transport has activated."""


class VirtioDevice:
    """Base class of device models.

    Subclasses set :attr:`device_id`, usually ``num_queues`` in ``__init__``, and override
    :meth:`device_features`, :meth:`read_config` and :meth:`process`; everything else has a
    default.
    """

    device_id: ClassVar[int]
    #: Name used by the CLI and the bus ("blk", "net", ...).
    name: ClassVar[str] = "device"

    def __init__(self, num_queues: int = 1, max_queue_size: int = 1024) -> None:
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.mem = GuestMemory()
        #: The device's virtqueues: split rings (section 2.7) until the driver acknowledges
        #: VIRTIO_F_RING_PACKED, then packed ones (section 2.8); devices see only
        #: :class:`~pvbus.virtio.queue.Virtqueue`.
        self.queues: list[Virtqueue] = [SplitQueue(max_queue_size) for _ in range(num_queues)]
        self.interrupt: Callable[[int], None] = _no_interrupt
        #: Set by a transport that can call :meth:`process` again for a queue once other work
        #: had its turn; without one, :meth:`drain` goes on until the queue is empty.
        self.requeue: Callable[[int], None] | None = None
        #: Set by the transport before any queue starts; devices with host-side I/O use it.
        self.reactor: Reactor | None = None
        self.acked_features = 0
        #: Counters of each queue; the device and its transport increment them.
        self.queue_stats = [QueueStats() for _ in range(num_queues)]

    # -- what the device offers -------------------------------------------------------------

    def device_features(self) -> int:
        """Feature bits offered, including the ring features (:data:`COMMON_FEATURES`)."""
        return COMMON_FEATURES

    def read_config(self) -> bytes:
        """The device configuration space (section 2.5), little-endian per the device type."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space; ignored by default."""

    def set_features(self, features: int) -> None:
        """The driver acknowledged ``features`` (a subset of :meth:`device_features`).

        The queues take the ring layout the features name: with VIRTIO_F_RING_PACKED they
        become :class:`~pvbus.virtio.packed.PackedQueue` s, without it split ones (only their
        size carries over; the transport sets the rest when it starts them).
        """
        self.acked_features = features
        self.use_packed_rings(bool(features & bit(F_RING_PACKED)))
        event_idx = bool(features & bit(F_EVENT_IDX))
        for queue in self.queues:
            queue.event_idx = event_idx

    @property
    def packed_rings(self) -> bool:
        """Whether the queues are packed virtqueues."""
        return isinstance(self.queues[0], PackedQueue) if self.queues else False

    def use_packed_rings(self, packed: bool) -> None:
        """Make every queue a packed (or a split) virtqueue, if it is not one already."""
        kind: type[PackedQueue] | type[SplitQueue] = PackedQueue if packed else SplitQueue
        for i, queue in enumerate(self.queues):
            if not isinstance(queue, kind):
                fresh = kind(queue.max_size)
                fresh.size = queue.size
                self.queues[i] = fresh

    # -- the data path ----------------------------------------------------------------------

    def process(self, index: int) -> None:
        """The driver kicked queue ``index``: handle what it made available.

        A :class:`~pvbus.virtio.QueueError` raised here makes the transport set
        DEVICE_NEEDS_RESET and stop the queue.
        """

    def queue_started(self, index: int) -> None:
        """Queue ``index`` became ready (a device with receive queues may start filling it)."""

    def queue_stopped(self, index: int) -> None:
        """Queue ``index`` stopped; the device must not touch it again until restarted."""

    def signal(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` if it asked for one (section 2.7.10)."""
        if self.queues[index].needs_notification(self.mem):
            self.interrupt(index)

    def drain(self, index: int, handle: Callable[[Virtqueue, GuestMemory], int]) -> None:
        """Process queue ``index`` with kicks suppressed until it is empty, then signal once.

        ``handle`` pops and completes what is available and returns how many it completed
        (it may stop early, after about :data:`DRAIN_WEIGHT`). The re-check after re-enabling
        kicks closes the race with a driver that added a chain while kicks were off (section
        2.7.10). Past :data:`DRAIN_WEIGHT` completions the queue is handed back to the
        transport (:attr:`requeue`), which calls it again after the other ready work.
        """
        queue = self.queues[index]
        mem = self.mem
        done = 0
        start = perf_counter_ns()
        # With EVENT_IDX nothing needs turning off: the driver kicks only when its available
        # index passes avail_event, which stays put until set_notification re-arms it.
        suppress = not queue.event_idx
        while True:
            if suppress:
                queue.set_notification(mem, False)
            done += handle(queue, mem)
            if done >= DRAIN_WEIGHT and self.requeue is not None:
                self.requeue(index)
                break
            if not queue.set_notification(mem, True):
                break
        if done:
            stats = self.queue_stats[index]
            stats.requests += done
            bucket = ((perf_counter_ns() - start) >> 10).bit_length()
            stats.latency[bucket if bucket < LATENCY_BUCKETS else LATENCY_BUCKETS - 1] += done
            self.signal(index)

    # -- reset ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset (section 2.1.2): common state, then :meth:`reset_device`."""
        self.acked_features = 0
        self.use_packed_rings(False)
        for queue in self.queues:
            queue.reset()
        self.reset_device()

    def reset_device(self) -> None:
        """Reset the device's own state; nothing by default."""
