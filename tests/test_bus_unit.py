"""Bus pieces without a daemon: the device-type registry, the stats block, the coalescer, the
event log, and the counters the data path keeps."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest

import pvbus.bus
from pvbus.bus import (
    DeviceSnapshot,
    EventLog,
    QueueSnapshot,
    StatsBlock,
    UnknownDeviceTypeError,
    device_type,
    device_types,
)
from pvbus.bus._worker import Coalescer, worker_argv
from pvbus.devices.base import LATENCY_BUCKETS, QueueStats, VirtioDevice
from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.frontend.rng import RngClient
from pvbus.testing import FakeGuest, MockDriverQueue


def test_exports() -> None:
    for name in pvbus.bus.__all__:
        assert hasattr(pvbus.bus, name), name


def test_blk_config_model_from_its_cli_options() -> None:
    blk = device_type("blk")
    assert "blk" in device_types()
    config = blk.config_model.model_validate({"image": "/x.img", "read_only": True})
    assert blk.argv(config) == [
        "--image", "/x.img", "--read-only", "--num-queues", "1",
        "--queue-size", str(config.model_dump()["queue_size"]), "--serial", "pvbus",
        "--io-threads", str(config.model_dump()["io_threads"]),
    ]  # fmt: skip
    assert blk.parse_args(blk.argv(config)).read_only is True
    with pytest.raises(pydantic.ValidationError, match="extra"):
        blk.config_model.model_validate({"image": "/x.img", "colour": 1})
    with pytest.raises(pydantic.ValidationError):
        blk.config_model.model_validate({"image": "/x.img", "num_queues": "two"})
    assert blk.qemu is not None and blk.qemu.driver == "vhost-user-blk-pci"
    with pytest.raises(UnknownDeviceTypeError):
        device_type("../blk")
    with pytest.raises(UnknownDeviceTypeError):
        device_type("nosuch")


def test_stats_block_round_trip() -> None:
    fd, reader = StatsBlock.create()
    writer = StatsBlock(fd, writable=True)
    try:
        assert not reader.ready and reader.snapshot().queues == ()
        writer.init(2)
        stats = [QueueStats(), QueueStats()]
        stats[1].requests, stats[1].bytes, stats[1].calls = 7, 7 * 4096, 3
        stats[1].latency[4] = 7
        writer.publish(
            stats,
            [0, 2],
            status=0x0F,
            needs_reset=False,
            connected=True,
            connections=1,
            rings_started=2,
        )
        writer.set_ready()
        snap = reader.snapshot()
        assert reader.ready and snap.connected and snap.status == 0x0F
        assert [q.requests for q in snap.queues] == [0, 7]
        assert snap.queues[1].bytes == 7 * 4096 and snap.queues[1].in_flight == 2
        assert snap.queues[1].latency == (0, 0, 0, 0, 7) + (0,) * (LATENCY_BUCKETS - 5)
        assert snap.total("calls") == 3
        with pytest.raises(ValueError, match="queues"):
            writer.init(10_000)
    finally:
        writer.close()
        reader.close()
        os.close(fd)


def _queue(requests: int, in_flight: int = 0, bucket: int = 0) -> QueueSnapshot:
    latency = tuple(requests if b == bucket else 0 for b in range(LATENCY_BUCKETS))
    return QueueSnapshot(1, requests, requests * 512, 1, 0, 0, in_flight, latency)


def test_snapshots_fold_across_worker_lifetimes() -> None:
    """A stopped worker's counters (retired) plus the next worker's give cumulative stats."""
    first = DeviceSnapshot(True, 0x0F, True, True, 1, 2, (_queue(5, 2, 3), _queue(1)))
    base = first.retired()
    assert (base.status, base.needs_reset, base.connected, base.rings_started) == (
        0,
        False,
        False,
        0,
    )
    assert [q.in_flight for q in base.queues] == [0, 0]
    assert [q.requests for q in base.queues] == [5, 1]
    second = DeviceSnapshot(True, 0x07, False, True, 1, 1, (_queue(2, 1, 4), _queue(0)))
    total = second.plus(base)
    assert [q.requests for q in total.queues] == [7, 1]
    assert [q.bytes for q in total.queues] == [7 * 512, 512]
    assert total.queues[0].in_flight == 1  # in flight now, on the live worker only
    assert total.queues[0].latency[3:5] == (5, 2)
    assert (total.status, total.connected, total.connections) == (0x07, True, 2)
    # A worker that has not published yet adds nothing; no base changes nothing.
    empty = DeviceSnapshot(False, 0, False, False, 0, 0)
    assert empty.plus(base).queues == base.queues
    assert second.plus(None) is second
    with pytest.raises(ValueError):
        DeviceSnapshot(True, 0, False, False, 0, 0, (_queue(1),)).plus(base)


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, cb in timers:
            cb()


def test_coalescer_batches_and_flushes() -> None:
    device = VirtioDevice(num_queues=2)
    sent: list[int] = []
    device.interrupt = sent.append
    loop = FakeLoop()
    Coalescer(device, loop, 0.001, 4)  # type: ignore[arg-type]
    stats = device.queue_stats[0]
    for _ in range(3):
        stats.requests += 1
        device.interrupt(0)
    assert sent == [] and stats.coalesced == 3
    assert [d for d, _ in loop.timers] == [0.001]  # one timer for the burst
    stats.requests += 1
    device.interrupt(0)  # the 4th completion since the last interrupt: sent at once
    assert sent == [0]
    device.queue_stats[1].requests += 1
    device.interrupt(1)
    loop.fire()
    assert sent == [0, 1]  # queue 0 had nothing pending any more
    loop.fire()
    assert sent == [0, 1]


def test_blk_counts_requests_bytes_errors_and_latency(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = BlockDevice(BlkConfig(image=str(image)))
    guest = FakeGuest(1 << 22)
    device.mem = guest.mem
    drv = MockDriverQueue(guest, 64)
    device.queues[0] = drv.device_queue
    device.interrupt = lambda _index: None
    for sector in (0, 8, 16):
        drv.send([struct.pack("<IIQ", 0, 0, sector)], [4096, 1])
    drv.send([struct.pack("<IIQ", 1, 0, 0), b"x" * 512], [1])
    drv.send([struct.pack("<IIQ", 0, 0, 1 << 40)], [512, 1])  # out of range: IOERR
    device.process(0)
    assert len(drv.receive()) == 5
    stats = device.queue_stats[0]
    assert stats.requests == 5
    assert stats.bytes == 3 * 4096 + 512
    assert stats.errors == 1
    assert sum(stats.latency) == 5
    device.close()


def test_event_log_orders_and_wakes_waiters() -> None:
    async def scenario() -> list[str]:
        log = EventLog(keep=3)
        waiter = asyncio.create_task(log.wait(0, 10))
        await asyncio.sleep(0)
        log.emit("DEVADD", device="a", vm="v")
        first = await waiter
        for t in ("DRIVER_OK", "DEVDROP", "VM_STOP"):
            log.emit(t)
        with pytest.raises(ValueError):
            log.emit("NOPE")
        assert await log.wait(log.last_seq, 0.01) == []
        return [e.type for e in first] + [f"{e.seq}:{e.type}" for e in log.since(0)]

    assert asyncio.run(scenario()) == ["DEVADD", "2:DRIVER_OK", "3:DEVDROP", "4:VM_STOP"]


def test_an_idle_worker_stops_publishing_and_a_busy_one_publishes_at_once(tmp_path: Path) -> None:
    """A real worker process: after its first publication, nothing while nobody uses it (it
    looks less and less often), then the frontend's requests within a fraction of a second."""
    fd, block = StatsBlock.create()
    sock = tmp_path / "rng.sock"
    proc = subprocess.Popen(worker_argv("rng", str(sock), fd, []), pass_fds=(fd,))
    try:
        wait_until(lambda: block.ready and block.published >= 1, 10)
        time.sleep(1.0)
        idle = block.published
        assert idle <= 2  # publishing every 20 ms would have made it 50
        with RngClient.connect(str(sock)) as rng:
            assert len(rng.read(4096)) == 4096
            start = time.monotonic()
            wait_until(lambda: block.snapshot().total("requests") >= 1, 5)
            assert time.monotonic() - start < 1.0  # at most one idle pause
        assert block.published > idle
    finally:
        proc.terminate()
        proc.wait(10)
        block.close()
        os.close(fd)


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
