"""A device worker: ``pvbus serve <type>`` plus a stats block and an interrupt-coalescing policy.

The bus runs one worker process per device (``python -m pvbus.bus._worker``), so a device
that crashes or stalls takes nothing else with it. The worker builds the device from the same
options as ``pvbus serve <type>``, serves it with the same :class:`VhostUserServer` on its own
socket, and publishes counters and status into the stats block it inherited (see
:mod:`pvbus.bus._stats`). SIGTERM stops it cleanly; the socket is removed.

Exit status: 0 after a signal, 2 for a bad configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pvbus.bus._registry import UnknownDeviceTypeError, device_type
from pvbus.bus._stats import IDLE_INTERVAL, PUBLISH_INTERVAL, StatsBlock
from pvbus.devices.base import VirtioDevice
from pvbus.server import EventLoop, VhostUserServer, listen_unix

log = logging.getLogger("pvbus.worker")

__all__ = ["Coalescer", "main", "worker_argv"]


def worker_argv(
    type_name: str,
    socket_path: str,
    stats_fd: int,
    device_args: Sequence[str],
    *,
    max_delay_us: int = 0,
    max_batch: int = 0,
) -> list[str]:
    """The command line that runs a worker in this interpreter."""
    argv = [sys.executable, "-m", "pvbus.bus._worker", "--stats-fd", str(stats_fd)]
    argv += ["--socket-path", socket_path]
    if max_delay_us:
        argv += ["--coalesce-delay-us", str(max_delay_us), "--coalesce-batch", str(max_batch)]
    return [*argv, type_name, *device_args]


class Coalescer:
    """Interrupt coalescing: hold used-buffer notifications back for up to ``max_delay`` s,
    unless ``max_batch`` requests completed on the queue since its last interrupt.

    It wraps the transport's interrupt trigger, so the device's own suppression logic
    (VIRTIO 1.2 2.7.10, event index) still decides *whether* the driver wants an interrupt;
    the policy only decides *when* to send it. Held-back notifications count as ``coalesced``.
    """

    def __init__(
        self, device: VirtioDevice, loop: EventLoop, max_delay: float, max_batch: int
    ) -> None:
        self.device = device
        self.loop = loop
        self.max_delay = max_delay
        self.max_batch = max(1, max_batch)
        self.inner: Callable[[int], None] = device.interrupt
        self.pending = [False] * device.num_queues
        self.completed_at_last = [0] * device.num_queues
        self.armed = False
        device.interrupt = self.interrupt

    def interrupt(self, index: int) -> None:
        stats = self.device.queue_stats[index]
        if stats.requests - self.completed_at_last[index] >= self.max_batch:
            self._fire(index)
            return
        stats.coalesced += 1
        self.pending[index] = True
        if not self.armed:
            self.armed = True
            self.loop.call_later(self.max_delay, self.flush)

    def _fire(self, index: int) -> None:
        self.pending[index] = False
        self.completed_at_last[index] = self.device.queue_stats[index].requests
        self.inner(index)

    def flush(self) -> None:
        """The delay ran out: send every held-back notification."""
        self.armed = False
        for index, pending in enumerate(self.pending):
            if pending:
                self._fire(index)


class _Publisher:
    """Copies the worker's counters and state into the stats block: every
    :data:`PUBLISH_INTERVAL` while they change; an idle worker looks less and less often (up
    to :data:`IDLE_INTERVAL`) and publishes nothing, so a hundred idle devices cost nothing."""

    def __init__(
        self, block: StatsBlock, device: VirtioDevice, server: VhostUserServer, loop: EventLoop
    ) -> None:
        self.block = block
        self.device = device
        self.server = server
        self.loop = loop
        self.interval = PUBLISH_INTERVAL
        self._seen: tuple[object, ...] = ()

    def _state(self) -> tuple[int, bool, bool, int, int]:
        """(status, needs_reset, connected, connections, rings_started), as the block holds them."""
        session = self.server.session
        if session is None:
            return 0, False, False, self.server.connections, 0
        started = sum(r.started for r in session.rings)
        return session.status, session.needs_reset, True, self.server.connections, started

    def _signature(self) -> tuple[object, ...]:
        """What a publication would show, cheaply: the state and the counters that move."""
        stats = self.device.queue_stats
        return (
            self.server.session,
            *self._state(),
            sum(q.kicks + q.requests + q.calls + q.errors + q.coalesced for q in stats),
        )

    def publish(self) -> None:
        queues = self.device.queues
        in_flight = [(q.next_avail - q.next_used) & 0xFFFF if q.ready else 0 for q in queues]
        status, needs_reset, connected, connections, rings_started = self._state()
        self.block.publish(
            self.device.queue_stats,
            in_flight,
            status=status,
            needs_reset=needs_reset,
            connected=connected,
            connections=connections,
            rings_started=rings_started,
        )

    def tick(self) -> None:
        seen = self._signature()
        if seen != self._seen:
            self._seen = seen
            self.publish()
            self.interval = PUBLISH_INTERVAL
        else:
            self.interval = min(2 * self.interval, IDLE_INTERVAL)
        self.loop.call_later(self.interval, self.tick)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvbus-worker", description=__doc__)
    p.add_argument("--stats-fd", type=int, required=True, help="inherited stats memfd")
    p.add_argument("--socket-path", required=True, help="vhost-user socket to listen on")
    p.add_argument("--coalesce-delay-us", type=int, default=0, help="max interrupt delay")
    p.add_argument("--coalesce-batch", type=int, default=0, help="max requests per interrupt")
    p.add_argument("type", help="device type")
    p.add_argument("device_args", nargs=argparse.REMAINDER, help="pvbus serve <type> options")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        dtype = device_type(args.type)
    except UnknownDeviceTypeError:
        print(f"pvbus-worker: unknown device type {args.type!r}", file=sys.stderr)
        return 2
    block = StatsBlock(args.stats_fd, writable=True)
    try:
        device: VirtioDevice = dtype.module.make_device(dtype.parse_args(args.device_args))
    except (ValueError, OSError) as err:
        print(f"pvbus-worker: {args.type}: {err}", file=sys.stderr)
        return 2
    try:
        block.init(device.num_queues)
        listener = listen_unix(args.socket_path)
    except (ValueError, OSError) as err:
        print(f"pvbus-worker: {args.socket_path}: {err}", file=sys.stderr)
        return 2
    loop = EventLoop()
    loop.stop_on_signals()
    server = VhostUserServer(device, listener, loop)
    if args.coalesce_delay_us > 0:
        Coalescer(device, loop, args.coalesce_delay_us / 1e6, args.coalesce_batch)
    publisher = _Publisher(block, device, server, loop)
    publisher.tick()
    block.set_ready()
    log.info("serving %s on %s (pid %d)", args.type, args.socket_path, os.getpid())
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket_path)
        publisher.publish()
        close = getattr(device, "close", None)
        if close is not None:
            close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
