"""virtio-rng device model on a fake guest: fills, partial fills, rate limit, bad chains."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pytest

from pvbus.devices.rng import RngConfig, RngDevice
from pvbus.devices.rng import cli as rng_cli
from pvbus.testing import FakeGuest, MockDriverQueue, MockPackedDriverQueue, mock_queue
from pvbus.virtio.constants import DeviceId
from pvbus.virtio.errors import QueueError

#: Whether the mock queues are packed rings (VIRTIO 1.2 section 2.8); every test runs with
#: split rings and then with packed ones (the ``ring_layout`` fixture).
PACKED = False


@pytest.fixture(autouse=True, params=[False, True], ids=["split", "packed"])
def ring_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PACKED", request.param)


class FakeReactor:
    """Timers that run only when the test says so."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        raise AssertionError("rng watches no fd")

    def remove_reader(self, fd: int) -> None:
        raise AssertionError("rng watches no fd")

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting_source() -> Callable[[int], bytes]:
    state = {"next": 0}

    def source(n: int) -> bytes:
        start = state["next"]
        state["next"] += n
        return bytes((start + i) & 0xFF for i in range(n))

    return source


def setup(
    config: RngConfig | None = None,
) -> tuple[RngDevice, MockDriverQueue | MockPackedDriverQueue, FakeReactor, Clock]:
    guest = FakeGuest()
    mock = mock_queue(guest, 16, packed=PACKED)
    clock = Clock()
    dev = RngDevice(config, source=counting_source(), clock=clock)
    dev.mem = guest.mem
    dev.queues[0] = mock.device_queue
    reactor = FakeReactor()
    dev.reactor = reactor
    interrupts: list[int] = []
    dev.interrupt = interrupts.append
    dev.queue_started(0)
    return dev, mock, reactor, clock


def test_identity_and_no_config() -> None:
    dev = RngDevice()
    assert dev.device_id == DeviceId.RNG
    assert int(dev.device_id) == 4
    assert dev.num_queues == 1
    assert dev.read_config() == b""


def test_fills_every_writable_buffer() -> None:
    dev, mock, _, _ = setup()
    mock.send([], [16, 48])
    mock.send([], [7], indirect=True)
    dev.process(0)
    used = mock.receive()
    assert [length for _, length, _ in used] == [64, 7]
    assert used[0][2][0] + used[0][2][1] == bytes(range(64))
    assert used[1][2][0] == bytes(range(64, 71))
    assert dev.bytes_served == 71


def test_real_entropy_differs() -> None:
    guest = FakeGuest()
    mock = mock_queue(guest, 8, packed=PACKED)
    dev = RngDevice()
    dev.mem, dev.queues[0] = guest.mem, mock.device_queue
    dev.queue_started(0)
    mock.send([], [256])
    mock.send([], [256])
    dev.process(0)
    (_, n1, (a,)), (_, n2, (b,)) = mock.receive()
    assert n1 == n2 == 256
    assert a != b and a != bytes(256)


def test_readable_only_chain_gets_zero_bytes() -> None:
    dev, mock, _, _ = setup()
    mock.send([b"junk"], [])
    mock.send([], [4])
    dev.process(0)
    assert [(length) for _, length, _ in mock.receive()] == [0, 4]


def test_buffer_outside_guest_memory_is_a_queue_error() -> None:
    dev, mock, _, _ = setup()
    mock.add([], [(0xDEAD0000, 16)])
    mock.publish()
    with pytest.raises(QueueError):
        dev.process(0)


def test_rate_limit_partial_fill_then_resume_on_timer() -> None:
    dev, mock, reactor, clock = setup(RngConfig(rate=100, burst=100))
    mock.send([], [80])
    mock.send([], [80])
    dev.process(0)
    used = mock.receive()
    # The bucket held 100 bytes: the first request gets 80, the second the 20 left.
    assert [length for _, length, _ in used] == [80, 20]
    mock.send([], [80])
    dev.process(0)
    assert mock.receive() == []
    assert len(reactor.timers) == 1  # one timer, however often the driver kicks
    dev.process(0)
    assert len(reactor.timers) == 1
    clock.now += 0.5  # 50 bytes worth of tokens
    reactor.fire()
    (_, length, (data,)) = mock.receive()[0]
    assert length == 50
    assert data[:50] == bytes(range(100, 150))


def test_rate_limit_never_exceeds_bucket_after_idle() -> None:
    dev, mock, _, clock = setup(RngConfig(rate=10, burst=30))
    clock.now += 3600
    mock.send([], [1000])
    dev.process(0)
    assert [length for _, length, _ in mock.receive()] == [30]


def test_timer_after_stop_does_nothing() -> None:
    dev, mock, reactor, clock = setup(RngConfig(rate=10, burst=10))
    mock.send([], [10])
    mock.send([], [10])
    dev.process(0)
    assert len(mock.receive()) == 1
    dev.queue_stopped(0)
    clock.now += 10
    reactor.fire()
    assert mock.receive() == []


def test_bad_ring_found_by_timer_is_reported_on_next_kick() -> None:
    dev, mock, reactor, clock = setup(RngConfig(rate=10, burst=10))
    mock.send([], [10])
    mock.add([], [(0xDEAD0000, 16)])
    mock.publish()
    dev.process(0)
    clock.now += 10
    reactor.fire()
    with pytest.raises(QueueError):
        dev.process(0)


@pytest.mark.parametrize(
    "kw", [{"rate": 0}, {"rate": -5}, {"burst": 10}, {"rate": 1, "burst": 0}, {"queue_size": 3}]
)
def test_config_rejects(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RngConfig(**kw)


def test_cli_builds_device() -> None:
    parser = argparse.ArgumentParser()
    rng_cli.add_arguments(parser)
    dev = rng_cli.make_device(parser.parse_args(["--rate-limit", "4096"]))
    assert dev.config.rate == 4096 and dev.config.bucket == 4096
    with pytest.raises(ValueError):
        rng_cli.make_device(parser.parse_args(["--rate-limit", "0"]))
