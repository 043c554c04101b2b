"""The learning switch (logic alone, then on real SEQPACKET sockets) and the stream backend."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.devices.net import (
    BackendClosedError,
    LearningSwitch,
    StreamBackend,
    SwitchServer,
    connect_switch,
    listen_seqpacket,
)
from pvbus.devices.net.frames import BROADCAST
from pvbus.testing import LoopThread

A = bytes.fromhex("525400000001")
B = bytes.fromhex("525400000002")
C = bytes.fromhex("525400000003")


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_learning_floods_then_forwards() -> None:
    sw: LearningSwitch[str] = LearningSwitch()
    for port in "abc":
        sw.add_port(port)
    assert sorted(sw.forward("a", eth(B, A))) == ["b", "c"]  # unknown: flood
    assert list(sw.forward("b", eth(A, B))) == ["a"]  # A was learnt on a
    assert list(sw.forward("a", eth(B, A))) == ["b"]  # B was learnt on b
    assert sorted(sw.forward("c", eth(BROADCAST, C))) == ["a", "b"]
    assert list(sw.forward("a", eth(A, B))) == []  # destination on the ingress port... B moved
    assert list(sw.forward("c", eth(B, C))) == ["a"]  # B now lives on a


def test_multicast_source_is_not_learnt_and_entries_age() -> None:
    clock = Clock()
    sw: LearningSwitch[int] = LearningSwitch(ageing_time=10, clock=clock)
    for port in (1, 2, 3):
        sw.add_port(port)
    sw.forward(1, eth(B, BROADCAST))
    assert BROADCAST not in sw.table
    sw.forward(1, eth(B, A))
    assert list(sw.forward(2, eth(A, B))) == [1]
    clock.now += 11
    assert sorted(sw.forward(3, eth(A, C))) == [1, 2]  # aged out: flood again


def test_removed_port_forgets_its_addresses() -> None:
    sw: LearningSwitch[int] = LearningSwitch()
    for port in (1, 2, 3):
        sw.add_port(port)
    sw.forward(1, eth(B, A))
    sw.remove_port(1)
    assert A not in sw.table
    assert sorted(sw.forward(2, eth(A, B))) == [3]


def test_table_is_bounded() -> None:
    sw: LearningSwitch[int] = LearningSwitch(max_entries=2)
    sw.add_port(1)
    for i in range(5):
        sw.forward(1, eth(BROADCAST, bytes([0x52, 0, 0, 0, 0, i])))
    assert len(sw.table) == 2


class SwitchThread:
    """A SwitchServer on its own event loop thread."""

    def __init__(self, path: str) -> None:
        self._thread = LoopThread()
        self.loop = self._thread.loop
        self.server = SwitchServer(listen_seqpacket(path), self.loop)
        self._thread.start()

    def close(self) -> None:
        self._thread.stop()
        self.server.close()
        self._thread.close()


@pytest.fixture
def switch_thread(tmp_path: Path) -> Iterator[SwitchThread]:
    sw = SwitchThread(str(tmp_path / "switch.sock"))
    yield sw
    sw.close()


@pytest.fixture
def switch(switch_thread: SwitchThread, tmp_path: Path) -> str:
    return str(tmp_path / "switch.sock")


def joined(sw: SwitchThread, count: int) -> None:
    """Wait until the switch has exactly ``count`` ports."""
    deadline = time.monotonic() + 10
    while len(sw.server.ports) != count:
        assert time.monotonic() < deadline, "ports not accepted"
        time.sleep(0.01)


def recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(70000)


def nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(70000)
    except TimeoutError:
        return True
    return False


def test_switch_server_forwards_between_ports(switch: str, switch_thread: SwitchThread) -> None:
    ports = [connect_switch(switch) for _ in range(3)]
    a, b, c = (p.sock for p in ports)
    try:
        for sock in (a, b, c):
            sock.setblocking(True)
        joined(switch_thread, 3)  # before the first frame, or it is not flooded to all
        first = eth(B, A, b"hello" * 20)
        a.send(first)
        assert recv(b) == first and recv(c) == first  # flooded
        reply = eth(A, B, b"world" * 20)
        b.send(reply)
        assert recv(a) == reply
        assert nothing_waiting(c)  # learnt: unicast to a only
        a.send(b"short")  # not even an Ethernet header: dropped
        big = eth(B, A, bytes(9000))  # a jumbo frame passes whole
        a.send(big)
        assert recv(b) == big
    finally:
        for p in ports:
            p.close()


def test_switch_survives_a_port_leaving(switch: str, switch_thread: SwitchThread) -> None:
    a, b = connect_switch(switch), connect_switch(switch)
    a.sock.setblocking(True)
    b.sock.setblocking(True)
    joined(switch_thread, 2)
    a.sock.send(eth(B, A))
    assert recv(b.sock)
    a.close()
    joined(switch_thread, 1)
    c = connect_switch(switch)
    c.sock.setblocking(True)
    joined(switch_thread, 2)
    b.sock.send(eth(A, B))  # A's port is gone: flooded to c
    assert recv(c.sock)[6:12] == B
    b.close()
    c.close()


def test_pvbus_switch_cli(tmp_path: Path) -> None:
    path = tmp_path / "sw.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvbus.cli.main", "switch", "--socket-path", str(path)]
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        a, b = connect_switch(str(path)), connect_switch(str(path))
        a.sock.setblocking(True)
        b.sock.setblocking(True)
        # The switch may not have accepted b yet: repeat until a frame gets through.
        for _ in range(50):
            a.sock.send(eth(BROADCAST, A))
            with contextlib.suppress(TimeoutError):
                assert recv(b.sock, 0.2)[6:12] == A
                break
        else:
            raise AssertionError("no frame through the switch")
        a.close()
        b.close()
        second = subprocess.run(
            [sys.executable, "-m", "pvbus.cli.main", "switch", "--socket-path", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 2 and "in use" in second.stderr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not path.exists()


# -- the stream backend (QEMU -netdev stream framing) -----------------------------------------


def test_stream_backend_framing() -> None:
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = StreamBackend(mine)
    try:
        frames = [eth(B, A, bytes([i]) * (50 + 300 * i)) for i in range(4)]
        wire = b"".join(struct.pack(">I", len(f)) + f for f in frames)
        buf = memoryview(bytearray(70000))
        got = []
        for i in range(0, len(wire), 7):  # frames arrive in odd pieces
            peer.send(wire[i : i + 7])
            while n := backend.recv_into(buf):
                got.append(bytes(buf[:n]))
        assert got == frames
        assert backend.send([frames[0][:10], frames[0][10:]])
        assert peer.recv(100000) == struct.pack(">I", len(frames[0])) + frames[0]
        peer.send(struct.pack(">I", 1 << 20))  # longer than any frame: the framing is lost
        with pytest.raises(BackendClosedError):
            backend.recv_into(buf)
    finally:
        backend.close()
        peer.close()


def test_stream_backend_peer_closing() -> None:
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = StreamBackend(mine)
    peer.close()
    with pytest.raises(BackendClosedError):
        backend.recv_into(memoryview(bytearray(2000)))
    backend.close()
