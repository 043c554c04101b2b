"""NetClient against the pvbus net backend over real vhost-user sockets on memfd memory.

In-process: the device runs on an event loop thread with a SEQPACKET socket pair as its host
side. End to end: ``pvbus switch`` and two ``pvbus serve net --switch`` processes with a
client on each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.devices.net import NetConfig, NetDevice, SeqpacketBackend, parse_mac
from pvbus.frontend.net import DRIVER_FEATURES, F_MRG_RXBUF, NetClient, NetClientError
from pvbus.testing import ServedDevice

MAC = parse_mac("52:54:00:00:10:01")
PEER = parse_mac("52:54:00:00:10:02")


def eth(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


class Served(ServedDevice):
    """A NetDevice served on a Unix socket by an event loop thread, its backend a socketpair."""

    device: NetDevice

    def __init__(self, path: str, config: NetConfig) -> None:
        self.peer, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        super().__init__(NetDevice(config, SeqpacketBackend(theirs)), path)

    def close(self) -> None:
        super().close()
        self.peer.close()

    def peer_recv(self, count: int, timeout: float = 5.0) -> list[bytes]:
        self.peer.settimeout(timeout)
        return [self.peer.recv(70000) for _ in range(count)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "net.sock"), NetConfig(mac=MAC, queue_pairs=2))
    yield s
    s.close()


def recv_all(client: NetClient, count: int, pair: int = 0) -> list[bytes]:
    out: list[bytes] = []
    while len(out) < count:
        got = client.recv(pair, timeout=5)
        assert got, f"received {len(out)} of {count} frames"
        out += got
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frames_both_ways(served: Served, tmp_path: Path, packed: bool) -> None:
    with NetClient.connect(str(tmp_path / "net.sock"), queue_size=64, packed=packed) as client:
        assert client.mac == MAC and client.info.link_up
        assert client.info.max_queue_pairs == 2
        frames = [eth(PEER, MAC, os.urandom(40 + 97 * i)) for i in range(15)]
        client.send_batch(frames)
        assert served.peer_recv(len(frames)) == frames
        # More than the ring holds, so the client must wait for the device to free slots.
        # (few enough for the socket pair's buffer: a backend with no room drops frames)
        many = [eth(PEER, MAC, i.to_bytes(4, "big") * 20) for i in range(120)]
        client.send_batch(many)
        assert served.peer_recv(120) == many
        assert served.device.stats.tx_dropped == 0
        incoming = [eth(MAC, PEER, os.urandom(46 + 101 * i)) for i in range(14)]
        for f in incoming:
            served.peer.send(f)
        assert recv_all(client, len(incoming)) == incoming
        assert served.device.stats.tx_errors == 0 == served.device.stats.rx_errors


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_merged_receive_buffers(served: Served, tmp_path: Path, packed: bool) -> None:
    path = str(tmp_path / "net.sock")
    with NetClient.connect(path, rx_buffer_size=256, packed=packed) as client:
        assert client.features & (1 << F_MRG_RXBUF)
        big = [eth(MAC, PEER, os.urandom(n)) for n in (100, 1500, 9000, 60000)]
        for f in big:
            served.peer.send(f)
        assert recv_all(client, len(big)) == big


def test_without_mrg_rxbuf_big_buffers_are_used(served: Served, tmp_path: Path) -> None:
    features = DRIVER_FEATURES & ~(1 << F_MRG_RXBUF)
    with NetClient.connect(str(tmp_path / "net.sock"), driver_features=features) as client:
        assert not client.mrg_rxbuf
        f = eth(MAC, PEER, b"m" * 1400)
        served.peer.send(f)
        assert recv_all(client, 1) == [f]


def test_rx_filter_and_mac_through_control_queue(served: Served, tmp_path: Path) -> None:
    other = parse_mac("52:54:00:00:10:99")
    with NetClient.connect(str(tmp_path / "net.sock")) as client:
        client.set_rx_mode(0, False)  # promiscuous off: own MAC, broadcast, table only
        client.set_mac_table([other], [])
        for dst in (PEER, MAC, other, b"\xff" * 6):
            served.peer.send(eth(dst, PEER, dst * 10))
        got = recv_all(client, 3)
        assert [f[:6] for f in got] == [MAC, other, b"\xff" * 6]
        assert client.recv(timeout=0.2) == []
        new = parse_mac("52:54:00:00:10:42")
        client.set_mac(new)
        served.peer.send(eth(new, PEER, b"n" * 50))
        assert [f[:6] for f in recv_all(client, 1)] == [new]
        with pytest.raises(NetClientError):
            client.set_queue_pairs(3)  # the device has two
        assert client.control(99, 0) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_two_queue_pairs(served: Served, tmp_path: Path, packed: bool) -> None:
    with NetClient.connect(str(tmp_path / "net.sock"), queue_pairs=2, packed=packed) as client:
        assert served.device.active_pairs == 2
        f = eth(PEER, MAC, b"from pair 1" * 5)
        client.send(f, pair=1)
        assert served.peer_recv(1) == [f]
        served.peer.send(eth(MAC, PEER, b"back" * 20))
        got = client.recv(0, timeout=0.5) + client.recv(1, timeout=0.5)
        assert len(got) == 1


def test_reconnect_resets_the_device(served: Served, tmp_path: Path) -> None:
    path = str(tmp_path / "net.sock")
    with NetClient.connect(path) as client:
        client.set_rx_mode(0, False)
    with NetClient.connect(path) as client:
        served.peer.send(eth(PEER, PEER, b"not for us" * 5))  # promiscuous again
        assert len(recv_all(client, 1)) == 1


# -- end to end: processes ----------------------------------------------------------------


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} not created"
        time.sleep(0.02)


def _pvbus(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pvbus.cli.main", *args])


def test_two_clients_through_switch_processes(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sw = tmp_path / "sw.sock"
        procs.append(_pvbus("switch", "--socket-path", str(sw)))
        _wait_socket(sw, procs[-1])
        socks = []
        for name, mac in (("a", MAC), ("b", PEER)):
            sock = tmp_path / f"{name}.sock"
            procs.append(
                _pvbus("serve", "net", "--socket-path", str(sock), "--switch", str(sw),
                       "--mac", mac.hex(":"))
            )  # fmt: skip
            _wait_socket(sock, procs[-1])
            socks.append(str(sock))
        with NetClient.connect(socks[0]) as a, NetClient.connect(socks[1]) as b:
            assert (a.mac, b.mac) == (MAC, PEER)
            hello = eth(b"\xff" * 6, MAC, b"hello" * 10)
            a.send(hello)
            assert recv_all(b, 1) == [hello]
            frames = [eth(MAC, PEER, i.to_bytes(2, "big") * 700) for i in range(100)]
            for i in range(0, 100, 10):  # paced, so no queue on the way overflows
                b.send_batch(frames[i : i + 10])
                assert recv_all(a, 10) == frames[i : i + 10]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(10) == 0


def test_serve_net_errors() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pvbus.cli.main", "serve", "net", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    caps = run("--print-capabilities")
    assert caps.returncode == 0 and '"type": "net"' in caps.stdout
    for args, message in (
        (("--socket-path", "/tmp/x.sock"), "one of --tap, --switch, --stream or --loopback"),
        (("--socket-path", "/tmp/x.sock", "--switch", "/nonexistent"), "cannot connect"),
        (("--socket-path", "/tmp/x.sock", "--tap", "x" * 20), "bad tap interface name"),
        (("--socket-path", "/tmp/x.sock", "--stream", "/x", "--mac", "01:00:00:00:00:00"), "MAC"),
        (("--socket-path", "/tmp/x.sock", "--stream", "/x", "--queue-pairs", "0"), "queue"),
    ):
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


def test_loopback_backend_reflects(tmp_path: Path) -> None:
    path = tmp_path / "lo.sock"
    proc = _pvbus("serve", "net", "--socket-path", str(path), "--loopback")
    try:
        _wait_socket(path, proc)
        with NetClient.connect(str(path)) as client:
            frames = [eth(MAC, PEER, bytes([i]) * (60 + i)) for i in range(50)]
            client.send_batch(frames)
            assert recv_all(client, 50) == frames
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
