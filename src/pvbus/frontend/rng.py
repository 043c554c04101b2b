"""A virtio-rng driver in userspace (VIRTIO 1.2 section 5.4) over any vhost-user-rng backend.

:class:`RngClient` posts device-writable buffers on the one request queue and returns what
the device wrote into them, so a backend's entropy (and its rate limit) is testable with no
VM. :meth:`RngClient.raw` sends any chain, malformed ones included.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pvbus.frontend._connection import DeviceClient, FrontendError, VhostUserFrontend
from pvbus.frontend._memory import MemfdMemory
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
from pvbus.virtio.constants import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, bit

__all__ = ["DRIVER_FEATURES", "RngClient", "RngClientError"]

DRIVER_FEATURES = bit(F_VERSION_1) | bit(F_EVENT_IDX) | bit(F_INDIRECT_DESC)


class RngClientError(FrontendError):
    """The device did not answer in time."""


class RngClient(DeviceClient):
    """A userspace virtio-rng driver on one vhost-user backend socket."""

    def __init__(
        self, frontend: VhostUserFrontend, *, queue_size: int = 64, buffer_size: int = 4096
    ) -> None:
        if queue_size < 1 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two")
        if buffer_size <= 0:
            raise ValueError("buffer size must be positive")
        self.frontend = frontend
        self.features = frontend.negotiate(DRIVER_FEATURES)
        if not self.features & bit(F_VERSION_1):
            raise FrontendError("the backend does not offer VIRTIO_F_VERSION_1")
        self.buffer_size = buffer_size
        self.memory = MemfdMemory(queue_size * buffer_size + (1 << 20))
        frontend.set_memory(self.memory)
        self.queue = frontend.start_queue(0, queue_size)
        self._area = self.memory.alloc(queue_size * buffer_size, 4096)
        self._free = list(range(queue_size - 1, -1, -1))
        self._slot_of: dict[int, int] = {}
        frontend.sync()

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        queue_size: int = 64,
        buffer_size: int = 4096,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
        timeout: float | None = 10.0,
    ) -> RngClient:
        """Connect to the backend listening at ``path`` and start its queue."""
        return cls._open(
            path,
            connect_timeout=timeout,
            protocol_features=protocol_features,
            packed=packed,
            queue_size=queue_size,
            buffer_size=buffer_size,
        )

    def _wait_used(self, deadline: float) -> list[tuple[int, int]]:
        ring = self.queue.ring
        while not (used := ring.get_used()):
            left = deadline - time.monotonic()
            if left <= 0 or not self.frontend.wait([self.queue], left):
                raise RngClientError("the device returned no buffer in time")
            self.queue.ack_calls()
        ring.set_interrupts(True)
        return used

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """``n`` bytes of the device's entropy, keeping the queue full of buffers meanwhile."""
        out = bytearray()
        size = self.buffer_size
        view = self._area.view
        base = self._area.gpa
        posted = 0
        deadline = time.monotonic() + timeout
        ring = self.queue.ring
        while len(out) < n:
            while self._free and posted * size < n - len(out):
                slot = self._free.pop()
                head = ring.add([], [(base + slot * size, size)])
                self._slot_of[head] = slot
                posted += 1
            self.queue.publish()
            for head, length in self._wait_used(deadline):
                slot = self._slot_of.pop(head)
                self._free.append(slot)
                posted -= 1
                if length > size:
                    raise RngClientError(f"device wrote {length} bytes into a {size}-byte buffer")
                out += view[slot * size : slot * size + length]
        # Buffers still posted are filled later; drop what they bring.
        while posted:
            for head, _ in self._wait_used(deadline):
                self._free.append(self._slot_of.pop(head))
                posted -= 1
        return bytes(out[:n])

    def raw(
        self, readable: Sequence[bytes], writable: Sequence[int], timeout: float = 5.0
    ) -> tuple[int, list[bytes]]:
        """Send one chain as given; return the used length and the writable buffers' contents."""
        rd = []
        for data in readable:
            buf = self.memory.alloc(max(len(data), 1))
            buf.view[: len(data)] = data
            rd.append((buf.gpa, len(data)))
        wr = [(self.memory.alloc(max(n, 1)).gpa, n) for n in writable]
        self.queue.ring.add(rd, wr)
        self.queue.publish()
        try:
            ((_, length),) = self._wait_used(time.monotonic() + timeout)
            return length, [bytes(self.memory.view(a, n)) for a, n in wr]
        finally:
            for gpa, _ in rd + wr:
                self.memory.free(gpa)
