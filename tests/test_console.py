"""virtio-console device model on a fake guest: single port, MULTIPORT control protocol,
flow control and malformed input."""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pvbus.devices.console import (
    ConsoleConfig,
    ConsoleDevice,
    FileBackend,
    MemoryBackend,
    PortSpec,
    open_backend,
)
from pvbus.devices.console import cli as console_cli
from pvbus.devices.console.device import (
    CONSOLE_PORT,
    CONTROL,
    DEVICE_ADD,
    DEVICE_READY,
    F_EMERG_WRITE,
    F_MULTIPORT,
    INPUT_HIGH_WATER,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    port_queues,
)
from pvbus.testing import FakeGuest, MockDriverQueue, MockPackedDriverQueue, mock_queue
from pvbus.virtio.errors import QueueError

#: Whether the mock queues are packed rings (VIRTIO 1.2 section 2.8); every test runs with
#: split rings and then with packed ones (the ``ring_layout`` fixture).
PACKED = False


@pytest.fixture(autouse=True, params=[False, True], ids=["split", "packed"])
def ring_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PACKED", request.param)


class FakeReactor:
    def __init__(self) -> None:
        self.timers: list[Callable[[], None]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        raise AssertionError("memory backends watch no fd")

    def remove_reader(self, fd: int) -> None:
        raise AssertionError("memory backends watch no fd")

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append(callback)

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for callback in timers:
            callback()


class Driver:
    """Just enough of a console driver to talk to the device through mock queues."""

    def __init__(self, config: ConsoleConfig, backends: list[MemoryBackend]) -> None:
        self.guest = FakeGuest(4 << 20)
        self.dev = ConsoleDevice(config, list(backends))
        self.backends = backends
        self.reactor = FakeReactor()
        self.dev.reactor = self.reactor
        self.dev.mem = self.guest.mem
        self.interrupts: list[int] = []
        self.dev.interrupt = self.interrupts.append
        self.q: list[MockDriverQueue | MockPackedDriverQueue] = []
        for i in range(self.dev.num_queues):
            mock = mock_queue(self.guest, 64, packed=PACKED)
            self.dev.queues[i] = mock.device_queue
            self.q.append(mock)
        for i in range(self.dev.num_queues):
            self.dev.queue_started(i)

    def kick(self, index: int) -> None:
        self.dev.process(index)

    def write(self, port: int, data: bytes) -> None:
        tx = port_queues(port)[1]
        self.q[tx].send([data])
        self.kick(tx)
        assert [n for _, n, _ in self.q[tx].receive()] == [0]

    def post_rx(self, port: int, size: int = 64, count: int = 1) -> None:
        rx = port_queues(port)[0]
        for _ in range(count):
            self.q[rx].send([], [size])
        self.kick(rx)

    def read(self, port: int) -> bytes:
        rx = port_queues(port)[0]
        return b"".join(bufs[0][:n] for _, n, bufs in self.q[rx].receive())

    def control(self, port: int, event: int, value: int) -> None:
        self.q[3].send([CONTROL.pack(port, event, value)])
        self.kick(3)
        assert len(self.q[3].receive()) == 1

    def post_control(self, count: int = 8) -> None:
        for _ in range(count):
            self.q[2].send([], [256])
        self.kick(2)

    def events(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for _, n, (buf,) in self.q[2].receive():
            port, event, value = CONTROL.unpack_from(buf)
            out.append((port, event, value, buf[CONTROL.size : n]))
        return out


def single() -> Driver:
    return Driver(ConsoleConfig(), [MemoryBackend()])


def multi(connected: bool = True) -> Driver:
    config = ConsoleConfig(
        ports=(PortSpec("memory"), PortSpec("memory", "org.pvbus.ctl"), PortSpec("memory", "b"))
    )
    return Driver(config, [MemoryBackend(connected) for _ in range(3)])


def handshake(d: Driver) -> list[tuple[int, int, int, bytes]]:
    d.post_control(16)
    d.control(0, DEVICE_READY, 1)
    adds = d.events()
    assert adds == [(i, DEVICE_ADD, 0, b"") for i in range(3)]
    for i in range(3):
        d.control(i, PORT_READY, 1)
    return d.events()


def test_single_port_layout() -> None:
    d = single()
    assert d.dev.num_queues == 2
    assert not d.dev.device_features() & (1 << F_MULTIPORT)
    assert d.dev.device_features() & (1 << F_EMERG_WRITE)
    assert struct.unpack("<HHII", d.dev.read_config()) == (0, 0, 1, 0)


def test_single_port_both_directions() -> None:
    d = single()
    d.write(0, b"hello host\n")
    assert bytes(d.backends[0].output) == b"hello host\n"
    d.backends[0].feed(b"hello guest\n")
    assert d.read(0) == b""  # no buffer posted yet: the input waits
    d.post_rx(0, size=5, count=4)
    assert d.read(0) == b"hello guest\n"
    assert d.dev.ports[0].to_guest == 12 and d.dev.ports[0].from_guest == 11


def test_output_gathered_from_several_buffers() -> None:
    d = single()
    d.q[1].send([b"ab", b"", b"cde"], indirect=True)
    d.kick(1)
    assert bytes(d.backends[0].output) == b"abcde"


def test_multiport_handshake() -> None:
    d = multi()
    assert d.dev.num_queues == 2 * (3 + 1)
    assert d.dev.device_features() & (1 << F_MULTIPORT)
    assert struct.unpack("<HHII", d.dev.read_config())[2] == 3
    events = handshake(d)
    assert events == [
        (0, CONSOLE_PORT, 1, b""),
        (0, PORT_OPEN, 1, b""),
        (1, PORT_NAME, 0, b"org.pvbus.ctl"),
        (1, PORT_OPEN, 1, b""),
        (2, PORT_NAME, 0, b"b"),
        (2, PORT_OPEN, 1, b""),
    ]


def test_control_messages_wait_for_buffers() -> None:
    d = multi()
    d.control(0, DEVICE_READY, 1)
    assert d.events() == []
    d.post_control(2)
    assert [e[1] for e in d.events()] == [DEVICE_ADD, DEVICE_ADD]
    d.post_control(2)
    assert [e[0] for e in d.events()] == [2]


def test_input_held_until_guest_opens_port() -> None:
    d = multi()
    handshake(d)
    d.post_rx(1, count=2)
    d.backends[1].feed(b"for the named port")
    assert d.read(1) == b""
    d.control(1, PORT_OPEN, 1)
    assert d.read(1) == b"for the named port"
    d.write(1, b"reply")
    assert bytes(d.backends[1].output) == b"reply"
    assert bytes(d.backends[0].output) == b""


def test_host_connect_and_disconnect_reach_the_guest() -> None:
    d = multi(connected=False)
    events = handshake(d)
    assert (1, PORT_OPEN, 1, b"") not in events
    d.backends[1].set_connected(True)
    assert d.events() == [(1, PORT_OPEN, 1, b"")]
    d.backends[1].set_connected(False)
    assert d.events() == [(1, PORT_OPEN, 0, b"")]
    d.write(1, b"nobody listens")
    assert bytes(d.backends[1].output) == b""


def test_malformed_control_messages_are_ignored() -> None:
    d = multi()
    d.post_control(16)
    d.q[3].send([b"\x00\x00"])  # short header
    d.q[3].send([CONTROL.pack(99, PORT_READY, 1)])  # no such port
    d.q[3].send([CONTROL.pack(0, 0x7777, 1)])  # unknown event
    d.q[3].send([CONTROL.pack(0, CONSOLE_PORT, 1)])  # a device-to-driver event
    d.q[3].send([], [8])  # wrong direction: nothing readable
    d.kick(3)
    assert len(d.q[3].receive()) == 5
    assert d.dev.control_errors == 5
    assert d.events() == []
    handshake(d)  # the device still works


def test_rx_chain_without_writable_buffer_gets_nothing() -> None:
    d = single()
    d.backends[0].feed(b"xyz")
    d.q[0].send([b"readable only"])
    d.q[0].send([], [8])
    d.kick(0)
    used = d.q[0].receive()
    assert [n for _, n, _ in used] == [0, 3]


def test_buffer_outside_memory_is_queue_error() -> None:
    d = single()
    d.q[1].add([(0xBAD00000, 8)])
    d.q[1].publish()
    with pytest.raises(QueueError):
        d.kick(1)


def test_ring_error_found_by_host_input_is_reported_on_next_kick() -> None:
    d = single()
    d.q[0].add([], [(0xBAD00000, 8)])
    d.q[0].publish()
    d.backends[0].feed(b"data")
    with pytest.raises(QueueError):
        d.kick(0)


def test_emergency_write() -> None:
    d = single()
    d.dev.write_config(8, b"!\0\0\0")
    d.dev.write_config(0, bytes(8) + b"?\0\0\0")
    assert bytes(d.backends[0].output) == b"!?"


def test_input_backpressure_pauses_backend() -> None:
    d = single()
    backend = d.backends[0]
    backend.feed(bytes(INPUT_HIGH_WATER))
    assert backend.paused
    for _ in range(INPUT_HIGH_WATER // (16 * 4096) + 2):
        d.post_rx(0, size=4096, count=16)
        d.read(0)
    assert not backend.paused
    assert d.dev.ports[0].pending == b""


def test_slow_host_output_backlog_is_flushed_in_order() -> None:
    d = single()
    backend = d.backends[0]
    backend.accept = 3
    d.write(0, b"0123456789")
    assert bytes(backend.output) == b"012"
    backend.accept = None
    d.reactor.fire()
    assert bytes(backend.output) == b"0123456789"


def test_reset_forgets_guest_state() -> None:
    d = multi()
    handshake(d)
    d.control(1, PORT_OPEN, 1)
    d.dev.reset()
    assert not d.dev.ports[1].ready and not d.dev.ports[1].guest_open


@pytest.mark.parametrize(
    "kw",
    [
        {"ports": ()},
        {"ports": (PortSpec("null", "named-console"),)},
        {"ports": (PortSpec("null"), PortSpec("null", "a"), PortSpec("null", "a"))},
        {"ports": (PortSpec("null"), PortSpec("null")), "multiport": False},
        {"ports": (PortSpec("null"), PortSpec("null")), "max_ports": 1},
        {"queue_size": 100},
    ],
)
def test_config_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ConsoleConfig(**kw)  # type: ignore[arg-type]


def test_port_spec_parse() -> None:
    assert PortSpec.parse("socket:/x,name=a.b") == PortSpec("socket:/x", "a.b")
    with pytest.raises(ValueError):
        PortSpec.parse("file:/x,color=red")
    with pytest.raises(ValueError):
        open_backend("tcp:1234")


def test_file_backend_appends(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old\n")
    backend = FileBackend(str(log))
    d = Driver(ConsoleConfig(), [backend])  # type: ignore[list-item]
    d.write(0, b"new\n")
    backend.close()
    assert log.read_bytes() == b"old\nnew\n"


def test_cli_builds_multiport_device(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    console_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--port", f"file:{tmp_path / 'log'}", "--port", f"socket:{tmp_path / 's'},name=n"]
    )
    dev = console_cli.make_device(args)
    try:
        assert dev.multiport and dev.num_queues == 6
        assert (tmp_path / "s").exists()
    finally:
        dev.close()
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError):
        console_cli.make_device(parser.parse_args(["--port", "file:/nonexistent/dir/x"]))
