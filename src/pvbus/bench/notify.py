"""Notification round trips: kick to call through a backend, against the bare eventfd floor.

The floor is two processes bouncing a count through two eventfds, each side waiting with
poll(2) and reading, which is exactly what a frontend and an epoll-driven backend do around
one request. The backend round trip is one zero-length virtio-blk read, timed from the kick
to the call: the backend wakes, walks a two-descriptor chain, writes the status, publishes the
used entry and signals the call eventfd; the frontend wakes (VIRTIO 1.2 sections 2.7.13,
2.7.14). Building the request before and reaping it after are not timed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Any

from pvbus.frontend import BlockClient


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """Round-trip times in microseconds."""

    name: str
    round_trips: int
    p50_us: float
    mean_us: float
    p99_us: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(name: str, samples: array[float]) -> NotifyResult:
    ordered = sorted(samples)
    n = len(ordered)
    return NotifyResult(
        name,
        n,
        ordered[n // 2] * 1e6,
        sum(ordered) / n * 1e6,
        ordered[min(n - 1, int(0.99 * n))] * 1e6,
    )


def _wait_read(poller: select.poll, fd: int) -> int:
    while True:
        poller.poll()
        with contextlib.suppress(BlockingIOError):
            return os.eventfd_read(fd)


def eventfd_pingpong(round_trips: int = 20000) -> NotifyResult:
    """The floor: an eventfd ping-pong between this process and a forked child."""
    ping = os.eventfd(0, os.EFD_NONBLOCK)
    pong = os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # child: answer every ping until told to stop (a value of 2)
        try:
            poller = select.poll()
            poller.register(ping, select.POLLIN)
            while _wait_read(poller, ping) == 1:
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    try:
        poller = select.poll()
        poller.register(pong, select.POLLIN)
        clock = time.perf_counter
        samples = array("d")
        for _ in range(round_trips + 200):
            t = clock()
            os.eventfd_write(ping, 1)
            _wait_read(poller, pong)
            samples.append(clock() - t)
        os.eventfd_write(ping, 2)
        os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ping)
        os.close(pong)
    return _summary("eventfd ping-pong", samples[200:])


def backend_roundtrip(socket_path: str, round_trips: int = 20000, name: str = "") -> NotifyResult:
    """Kick-to-call round trips of zero-length reads through the backend at ``socket_path``."""
    client = BlockClient.connect(socket_path, queue_size=8, memory_size=1 << 20)
    try:
        q = client.queues[0]
        fq = q.fq
        poller = select.poll()
        poller.register(fq.call_fd, select.POLLIN)
        clock = time.perf_counter
        samples = array("d")
        kick_fd = fq.kick_fd
        write = os.eventfd_write
        for _ in range(round_trips + 200):
            q.submit_read(0, 0)
            q.fq.ring.publish()  # the index only: the kick is what is timed
            t = clock()
            write(kick_fd, 1)
            if not poller.poll(10000):
                raise TimeoutError("no call from the backend in 10 s")
            samples.append(clock() - t)
            fq.kicks += 1
            fq.ack_calls()
            done = q.reap()
            while not done:  # a call for an earlier completion; wait for this one
                poller.poll(10000)
                fq.ack_calls()
                done = q.reap()
            done[0].check()
        return _summary(name or f"kick-to-call via {socket_path}", samples[200:])
    finally:
        client.close()
