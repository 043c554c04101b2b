"""virtio-rng (VIRTIO 1.2 section 5.4): entropy from ``os.getrandom`` for the guest.

One queue (``requestq``); the driver posts device-writable buffers and the device fills them
(section 5.4.6). Filling fewer bytes than offered is allowed, which is how the optional rate
limit works: a token bucket refilled at ``rate`` bytes per second, holding at most ``burst``
bytes. When the bucket is empty the device leaves the remaining buffers in the ring and
resumes from a :meth:`Reactor.call_later` timer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pvbus.devices.base import VirtioDevice
from pvbus.virtio.constants import DeviceId
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.queue import Virtqueue

#: Most bytes given for one request: a driver offering more gets a partial fill (5.4.6.1).
MAX_CHUNK = 1 << 20
#: The least a rate-limited device waits to gather before it resumes (avoids a timer per byte).
MIN_RESUME = 64

log = logging.getLogger(__name__)

Source = Callable[[int], bytes]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RngConfig:
    """Validated configuration of one virtio-rng device.

    ``rate`` limits the bytes per second given to the guest (``None``: unlimited); ``burst``
    is the bucket size (default: one second's worth).
    """

    rate: int | None = None
    burst: int | None = None
    queue_size: int = 1024

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate limit {self.rate} is not a positive number of bytes/s")
        if self.burst is not None and (self.burst <= 0 or self.rate is None):
            raise ValueError("burst needs a rate limit and must be positive")
        qs = self.queue_size
        if qs < 1 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two in 1..32768")

    @property
    def bucket(self) -> int:
        """Capacity of the token bucket in bytes."""
        if self.burst is not None:
            return self.burst
        return max(self.rate or 0, 1)


def _getrandom(n: int) -> bytes:
    return os.getrandom(n)


class RngDevice(VirtioDevice):
    """An entropy device; ``source`` and ``clock`` are injectable for tests."""

    device_id = DeviceId.RNG
    name = "rng"

    def __init__(
        self,
        config: RngConfig | None = None,
        *,
        source: Source = _getrandom,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config or RngConfig()
        super().__init__(1, self.config.queue_size)
        self.source = source
        self.clock = clock
        self.tokens = float(self.config.bucket)
        self._last = clock()
        self._timer_armed = False
        self._active = False
        self._failed: QueueError | None = None
        #: Bytes given to the guest since the device was created.
        self.bytes_served = 0

    # features and config: only the common ring features; no config space (5.4.3, 5.4.4).

    def queue_started(self, index: int) -> None:
        self._active = True
        self._failed = None

    def queue_stopped(self, index: int) -> None:
        self._active = False

    def process(self, index: int) -> None:
        if index != 0:
            raise QueueError(f"virtio-rng has one queue, not {index + 1}")
        if self._failed is not None:
            err, self._failed = self._failed, None
            raise err
        self._serve()

    def _serve(self) -> None:
        """Like :meth:`drain`, but stops (kicks left on) once the bucket runs dry."""
        queue, mem = self.queues[0], self.mem
        done = 0
        while True:
            queue.set_notification(mem, False)
            n, limited = self._fill(queue, mem)
            done += n
            if limited:
                queue.set_notification(mem, True)
                break
            if not queue.set_notification(mem, True):
                break
        if done:
            self.queue_stats[0].requests += done
            self.signal(0)

    def _refill(self) -> None:
        rate = self.config.rate
        if rate is None:
            return
        now = self.clock()
        self.tokens = min(float(self.config.bucket), self.tokens + (now - self._last) * rate)
        self._last = now

    def _allowance(self) -> int:
        """Bytes the next request may get now."""
        if self.config.rate is None:
            return MAX_CHUNK
        self._refill()
        return min(int(self.tokens), MAX_CHUNK)

    def _fill(self, queue: Virtqueue, mem: GuestMemory) -> tuple[int, bool]:
        """Complete requests; return how many, and whether the rate limit stopped us."""
        done = 0
        while True:
            allowance = self._allowance()
            if allowance <= 0:
                if queue.pending(mem):
                    self._arm_timer()
                    return done, True
                return done, False
            chain = queue.pop(mem)
            if chain is None:
                return done, False
            written = 0
            for addr, length in chain.writable:
                n = min(length, allowance - written)
                if n <= 0:
                    break
                try:
                    view = mem.translate(addr, n)
                except GuestMemoryError as err:
                    raise QueueError(f"request {chain.head}: {err}") from err
                view[:] = self.source(n)
                written += n
            # A chain with no writable byte gets nothing back (5.4.6.1: zero-length buffer).
            queue.add_used(mem, chain.head, written)
            self.bytes_served += written
            self.queue_stats[0].bytes += written
            if self.config.rate is not None:
                self.tokens -= written
            done += 1

    def _arm_timer(self) -> None:
        rate = self.config.rate
        if self._timer_armed or self.reactor is None or rate is None:
            return
        want = min(MIN_RESUME, self.config.bucket) - self.tokens
        self._timer_armed = True
        self.reactor.call_later(max(want, 1.0) / rate, self._resume)

    def _resume(self) -> None:
        self._timer_armed = False
        if not self._active:
            return
        try:
            self._serve()
        except QueueError as err:
            # No transport is on the stack of a timer: keep the error for the next kick,
            # which raises it where the transport marks the device as needing a reset.
            log.error("virtio-rng: %s", err)
            self._failed = err

    def reset_device(self) -> None:
        self._failed = None
        self.tokens = float(self.config.bucket)
        self._last = self.clock()
