"""The stats block: a small shared-memory page per device, written by its worker, read by the bus.

The daemon creates a memfd of :data:`BLOCK_SIZE` bytes and hands it to the worker, which
copies its devices' :class:`~pvbus.devices.base.QueueStats` and its vhost-user status into
it every :data:`PUBLISH_INTERVAL` seconds while anything changes, backing off to
:data:`IDLE_INTERVAL` while nothing does (and once more on exit). Every slot is an aligned
u64, written whole, so a reader never sees a torn number; a snapshot may mix two publications,
which is harmless for monotonic counters.

Layout: :data:`HEADER_SLOTS` header slots (``H_*``), then :data:`QUEUE_SLOTS` per queue
(``Q_*`` then the latency histogram), for at most :data:`MAX_QUEUES` queues.
"""

from __future__ import annotations

import array
import mmap
import os
from dataclasses import dataclass, field, replace
from typing import Any

from pvbus.devices.base import LATENCY_BUCKETS, QueueStats

__all__ = [
    "BLOCK_SIZE",
    "IDLE_INTERVAL",
    "LATENCY_BOUNDS",
    "MAX_QUEUES",
    "PUBLISH_INTERVAL",
    "DeviceSnapshot",
    "QueueSnapshot",
    "StatsBlock",
]

MAGIC = 0x7076627573535431  # "pvbusST1"
PUBLISH_INTERVAL = 0.02
#: Longest pause between two looks of an idle worker (the interval doubles up to it).
IDLE_INTERVAL = 0.32

H_MAGIC, H_NUM_QUEUES, H_PID, H_READY, H_STATUS, H_NEEDS_RESET = range(6)
H_CONNECTED, H_CONNECTIONS, H_RINGS_STARTED, H_PUBLISHED = range(6, 10)
HEADER_SLOTS = 16

Q_KICKS, Q_REQUESTS, Q_BYTES, Q_CALLS, Q_ERRORS, Q_COALESCED, Q_IN_FLIGHT = range(7)
Q_LATENCY = 8
QUEUE_SLOTS = Q_LATENCY + LATENCY_BUCKETS

MAX_QUEUES = 256
BLOCK_SIZE = -(-(HEADER_SLOTS + MAX_QUEUES * QUEUE_SLOTS) * 8 // mmap.PAGESIZE) * mmap.PAGESIZE

#: Upper bound (seconds) of each latency bucket; the last is open (+Inf).
LATENCY_BOUNDS = tuple((1 << b) * 1.024e-6 for b in range(LATENCY_BUCKETS - 1))


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """One queue's counters at one moment."""

    kicks: int
    requests: int
    bytes: int
    calls: int
    errors: int
    coalesced: int
    in_flight: int
    latency: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kicks": self.kicks,
            "requests": self.requests,
            "bytes": self.bytes,
            "calls": self.calls,
            "errors": self.errors,
            "coalesced": self.coalesced,
            "in_flight": self.in_flight,
            "latency": list(self.latency),
        }

    def plus(self, other: QueueSnapshot) -> QueueSnapshot:
        """Counters, histogram and in-flight added up."""
        return QueueSnapshot(
            self.kicks + other.kicks,
            self.requests + other.requests,
            self.bytes + other.bytes,
            self.calls + other.calls,
            self.errors + other.errors,
            self.coalesced + other.coalesced,
            self.in_flight + other.in_flight,
            tuple(a + b for a, b in zip(self.latency, other.latency, strict=True)),
        )


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """A device's status and per-queue counters at one moment."""

    ready: bool
    status: int
    needs_reset: bool
    connected: bool
    connections: int
    rings_started: int
    queues: tuple[QueueSnapshot, ...] = field(default=())

    def total(self, name: str) -> int:
        """The sum of counter ``name`` over all queues."""
        return sum(getattr(q, name) for q in self.queues)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "status": self.status,
            "needs_reset": self.needs_reset,
            "connected": self.connected,
            "connections": self.connections,
            "rings_started": self.rings_started,
            "queues": [q.to_dict() for q in self.queues],
        }

    def retired(self) -> DeviceSnapshot:
        """What a stopped worker leaves behind: its counters, nothing connected or in flight."""
        return DeviceSnapshot(
            self.ready,
            0,
            False,
            False,
            self.connections,
            0,
            tuple(replace(q, in_flight=0) for q in self.queues),
        )

    def plus(self, base: DeviceSnapshot | None) -> DeviceSnapshot:
        """This (live) snapshot with ``base``'s counters added queue by queue.

        ``base`` is what earlier workers of the device left behind (:meth:`retired`), so the
        device's counters stay cumulative across worker lifetimes; status and connection come
        from this snapshot. A side without queues (a worker not yet published) adds nothing.
        """
        if base is None:
            return self
        if not self.queues:
            queues = base.queues
        elif not base.queues:
            queues = self.queues
        else:
            queues = tuple(a.plus(b) for a, b in zip(self.queues, base.queues, strict=True))
        return replace(self, connections=self.connections + base.connections, queues=queues)


class StatsBlock:
    """A mapped stats block (the writer is the worker, the reader the daemon)."""

    def __init__(self, fd: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, BLOCK_SIZE, mmap.MAP_SHARED, prot)
        self.slots = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls) -> tuple[int, StatsBlock]:
        """A new zeroed memfd (inheritable by a worker) and the daemon's mapping of it."""
        fd = os.memfd_create("pvbus-stats", 0)
        os.ftruncate(fd, BLOCK_SIZE)
        return fd, cls(fd, writable=False)

    def close(self) -> None:
        """Unmap."""
        self.slots.release()
        self._map.close()

    # -- writer -----------------------------------------------------------------------------

    def init(self, num_queues: int) -> None:
        """Worker side: stamp the header once the device exists."""
        if num_queues > MAX_QUEUES:
            raise ValueError(f"{num_queues} queues, the stats block holds {MAX_QUEUES}")
        s = self.slots
        s[H_NUM_QUEUES] = num_queues
        s[H_PID] = os.getpid()
        s[H_MAGIC] = MAGIC

    def publish(
        self,
        stats: list[QueueStats],
        in_flight: list[int],
        *,
        status: int,
        needs_reset: bool,
        connected: bool,
        connections: int,
        rings_started: int,
    ) -> None:
        """Worker side: copy the counters and status in."""
        s = self.slots
        for i, q in enumerate(stats):
            base = HEADER_SLOTS + i * QUEUE_SLOTS
            s[base : base + QUEUE_SLOTS] = array.array(
                "Q",
                [
                    q.kicks,
                    q.requests,
                    q.bytes,
                    q.calls,
                    q.errors,
                    q.coalesced,
                    in_flight[i],
                    0,
                    *q.latency,
                ],
            )
        s[H_STATUS] = status
        s[H_NEEDS_RESET] = needs_reset
        s[H_CONNECTED] = connected
        s[H_CONNECTIONS] = connections
        s[H_RINGS_STARTED] = rings_started
        s[H_PUBLISHED] += 1

    def set_ready(self) -> None:
        """Worker side: the socket is listening."""
        self.slots[H_READY] = 1

    # -- reader -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The worker has its device and listens."""
        return self.slots[H_MAGIC] == MAGIC and bool(self.slots[H_READY])

    @property
    def published(self) -> int:
        """How many times the worker published (a reader can wait for the next one)."""
        return int(self.slots[H_PUBLISHED])

    def snapshot(self) -> DeviceSnapshot:
        """Daemon side: a copy of everything."""
        s = self.slots
        if s[H_MAGIC] != MAGIC:
            return DeviceSnapshot(False, 0, False, False, 0, 0)
        n = min(int(s[H_NUM_QUEUES]), MAX_QUEUES)
        queues = []
        for i in range(n):
            base = HEADER_SLOTS + i * QUEUE_SLOTS
            q = s[base : base + QUEUE_SLOTS].tolist()
            queues.append(
                QueueSnapshot(
                    q[Q_KICKS],
                    q[Q_REQUESTS],
                    q[Q_BYTES],
                    q[Q_CALLS],
                    q[Q_ERRORS],
                    q[Q_COALESCED],
                    q[Q_IN_FLIGHT],
                    tuple(q[Q_LATENCY:]),
                )
            )
        return DeviceSnapshot(
            bool(s[H_READY]),
            int(s[H_STATUS]),
            bool(s[H_NEEDS_RESET]),
            bool(s[H_CONNECTED]),
            int(s[H_CONNECTIONS]),
            int(s[H_RINGS_STARTED]),
            tuple(queues),
        )
