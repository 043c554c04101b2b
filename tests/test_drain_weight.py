"""A queue the driver keeps full must not starve the device's other queues or its socket.

:meth:`VirtioDevice.drain` hands a queue back to the transport after ``DRAIN_WEIGHT``
completions; the vhost-user server kicks it again itself, so the loop serves the others in
between. Real socket, real eventfds, a device whose first queue never runs dry.
"""

from __future__ import annotations

import time
from pathlib import Path

from pvbus.devices.base import DRAIN_WEIGHT, VirtioDevice
from pvbus.frontend import VhostUserFrontend
from pvbus.frontend._memory import MemfdMemory
from pvbus.testing import ServedDevice
from pvbus.virtio.constants import F_VERSION_1, bit
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.queue import Virtqueue


class HotAndCold(VirtioDevice):
    """Queue 0 always has more (its handler never consumes); queue 1 is a plain echo."""

    device_id = 4

    def __init__(self) -> None:
        super().__init__(num_queues=2)
        self.hot_rounds = 0
        self.cold_done = 0

    def process(self, index: int) -> None:
        self.drain(index, self._hot if index == 0 else self._cold)

    def _hot(self, queue: Virtqueue, mem: GuestMemory) -> int:
        self.hot_rounds += 1
        return 300  # claims work but leaves the chain available: the ring never empties

    def _cold(self, queue: Virtqueue, mem: GuestMemory) -> int:
        done = 0
        while (chain := queue.pop(mem)) is not None:
            queue.add_used(mem, chain.head, 0)
            done += 1
        self.cold_done += done
        return done


def test_a_hot_queue_leaves_room_for_the_others(tmp_path: Path) -> None:
    device = HotAndCold()
    with ServedDevice(device, tmp_path / "hot.sock") as served:
        frontend = VhostUserFrontend(str(served.path), timeout=5)
        try:
            frontend.negotiate(bit(F_VERSION_1))
            memory = MemfdMemory(1 << 20)
            frontend.set_memory(memory)
            hot = frontend.start_queue(0, 8)
            cold = frontend.start_queue(1, 8)
            buf = memory.alloc(64)
            hot.ring.add([(buf.gpa, 64)])
            hot.ring.publish()
            hot.kick()
            deadline = time.monotonic() + 5
            while device.hot_rounds < 10 * DRAIN_WEIGHT // 300 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert device.hot_rounds >= 10 * DRAIN_WEIGHT // 300  # it keeps being served
            # The cold queue is served while the hot one still spins...
            cold.ring.add([(buf.gpa, 64)])
            cold.ring.publish()
            cold.kick()
            assert frontend.wait([cold], 5), "the cold queue was starved"
            assert cold.ring.get_used() != []
            assert device.cold_done == 1
            # ... and so is the vhost-user socket.
            before = device.hot_rounds
            frontend.sync()
            assert device.hot_rounds > before
        finally:
            frontend.close()
