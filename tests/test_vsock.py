"""VsockClient (the guest's side) against the pvbus vsock backend over vhost-user, with real
host Unix sockets: connections both ways, credit flow control, shutdown, malformed packets."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.devices.vsock import VsockConfig, VsockDevice
from pvbus.devices.vsock import cli as vsock_cli
from pvbus.frontend.vsock import (
    HEADER,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RST,
    OP_RW,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    VsockClient,
    VsockClientError,
)
from pvbus.testing import ServedDevice

CID = 7


class Served(ServedDevice):
    """A VsockDevice served on a Unix socket by an event loop thread."""

    device: VsockDevice

    def __init__(self, path: str, config: VsockConfig) -> None:
        super().__init__(VsockDevice(config), path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    s = Served(str(tmp_path / "vhost.sock"), VsockConfig(CID, str(tmp_path / "v.sock")))
    yield s, tmp_path
    s.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def client(served: tuple[Served, Path], request: pytest.FixtureRequest) -> Iterator[VsockClient]:
    """A driver on split rings, then on packed ones (every test that takes it runs twice)."""
    sock = str(served[1] / "vhost.sock")
    with VsockClient.connect_backend(sock, buf_alloc=8192, packed=request.param) as c:
        yield c


def host_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    sock.settimeout(5)
    return sock


def host_connect(path: Path, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return sock, line


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n}"
        out += chunk
    return bytes(out)


def packet(op: int, src_port: int = 1000, dst_port: int = 5000, **kw: int) -> bytes:
    payload = bytes(kw.pop("payload_len", 0))
    return (
        HEADER.pack(
            kw.get("src_cid", CID),
            kw.get("dst_cid", HOST_CID),
            src_port,
            dst_port,
            kw.get("length", len(payload)),
            kw.get("ptype", TYPE_STREAM),
            op,
            0,
            65536,
            0,
        )
        + payload
    )


def test_config_space_has_guest_cid(client: VsockClient) -> None:
    assert client.cid == CID


def test_guest_connects_to_host_port(served: tuple[Served, Path], client: VsockClient) -> None:
    _, tmp = served
    listener = host_listener(tmp / "v.sock_5000")
    stream = client.connect(5000)
    conn, _ = listener.accept()
    conn.settimeout(5)
    client.send(stream, b"hello host")
    assert recv_exactly(conn, 10) == b"hello host"
    conn.sendall(b"hello guest")
    assert client.recv(stream, 11) == b"hello guest"
    # 1 MiB each way through an 8 KiB guest buffer and the device's 256 KiB: credit at work.
    big = os.urandom(1 << 20)
    got = bytearray()

    def reader() -> None:
        while len(got) < len(big):
            chunk = conn.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    client.send(stream, big)
    t.join(30)
    assert bytes(got) == big
    sender = threading.Thread(target=conn.sendall, args=(big,))
    sender.start()
    assert client.recv(stream, len(big), timeout=30) == big
    sender.join(10)
    ops = {p[6] for p in client.packets}
    assert OP_CREDIT_UPDATE in ops
    client.close_stream(stream)
    assert conn.recv(1) == b""  # the host end is closed after the guest's close
    conn.close()
    listener.close()


def test_guest_connect_to_missing_host_port_is_reset(client: VsockClient) -> None:
    with pytest.raises(VsockClientError, match="refused"):
        client.connect(4444)


def test_host_connects_to_guest_port(served: tuple[Served, Path], client: VsockClient) -> None:
    _, tmp = served
    client.listen(1234)
    result: dict[str, object] = {}

    def host() -> None:
        sock, line = host_connect(tmp / "v.sock", 1234)
        result["line"] = line
        sock.sendall(b"ping")
        result["reply"] = recv_exactly(sock, 4)
        sock.shutdown(socket.SHUT_WR)
        result["eof"] = sock.recv(1)
        sock.close()

    t = threading.Thread(target=host)
    t.start()
    stream = client.accept(1234)
    assert client.recv(stream, 4) == b"ping"
    client.send(stream, b"pong")
    # The host's SHUT_WR arrives as SHUTDOWN(SEND): the guest reads EOF.
    client.wait_for(lambda: bool(stream.peer_shutdown & SHUTDOWN_SEND), "host shutdown")
    client.close_stream(stream)
    t.join(10)
    assert not t.is_alive()
    line = result["line"]
    assert isinstance(line, bytes) and line.startswith(b"OK ")
    assert int(line.split()[1]) >= 1 << 30
    assert result["reply"] == b"pong"
    assert result["eof"] == b""


def test_host_connect_to_closed_guest_port_closes_socket(
    served: tuple[Served, Path], client: VsockClient
) -> None:
    _, tmp = served
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(host_connect(tmp / "v.sock", 999)[1]))
    t.start()
    client.wait_for(lambda: any(p[6] == OP_REQUEST for p in client.packets), "REQUEST")
    client.wait_for(lambda: not t.is_alive(), "host socket closed")
    t.join()
    assert out == [b""]


@pytest.mark.parametrize("line", [b"HELLO 5\n", b"CONNECT x\n", b"CONNECT\n", b"A" * 100])
def test_bad_connect_lines_are_refused(
    served: tuple[Served, Path], client: VsockClient, line: bytes
) -> None:
    _, tmp = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(tmp / "v.sock"))
    sock.sendall(line)
    # Closed with our unread bytes still queued is a reset: also a refusal.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""
    sock.close()


def test_malformed_packets(served: tuple[Served, Path], client: VsockClient) -> None:
    device = served[0].device
    client.send_packet(b"\x01\x02\x03")  # short header: dropped
    client.send_packet(packet(OP_RW, src_cid=99))  # wrong source CID: dropped
    client.send_packet(packet(OP_RW, dst_cid=5))  # not for the host: dropped
    client.send_packet(packet(OP_RW, src_port=1, length=100))  # len beyond payload: RST
    client.send_packet(packet(OP_REQUEST, src_port=2, ptype=2))  # seqpacket not offered: RST
    client.send_packet(packet(OP_RW, src_port=3, payload_len=10))  # no such connection: RST
    client.send_packet(packet(0x55, src_port=4))  # unknown op, no connection: RST
    client.send_packet(packet(OP_RST, src_port=5))  # RST for nothing: ignored
    client.send_packet(packet(OP_CREDIT_REQUEST, src_port=6), writable=64)  # wrong direction
    client.wait_for(lambda: device.errors >= 8, "errors counted")
    client.wait_for(
        lambda: sorted(p[3] for p in client.packets if p[6] == OP_RST) == [1, 2, 3, 4, 6],
        "RSTs",
    )
    # Still works.
    listener = host_listener(served[1] / "v.sock_77")
    stream = client.connect(77)
    conn, _ = listener.accept()
    client.send(stream, b"ok")
    assert recv_exactly(conn, 2) == b"ok"
    conn.close()
    listener.close()


def test_guest_overrunning_credit_is_reset(
    served: tuple[Served, Path], client: VsockClient
) -> None:
    _, tmp = served
    listener = host_listener(tmp / "v.sock_88")
    stream = client.connect(88)
    conn, _ = listener.accept()  # never reads: the device's buffer fills up
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Ignore credit on purpose: 2 MiB raw, past buf_alloc plus whatever the socket holds.
    for _ in range(512):
        client._packet(stream, OP_RW, bytes(4096))
        client.poll()
        if stream.state == "closed":
            break
    client.wait_for(lambda: stream.state == "closed", "RST")
    assert stream.reset
    conn.close()
    listener.close()


def test_frontend_disconnect_closes_host_sockets(served: tuple[Served, Path]) -> None:
    _, tmp = served
    listener = host_listener(tmp / "v.sock_9")
    client = VsockClient.connect_backend(str(tmp / "vhost.sock"))
    client.connect(9)
    conn, _ = listener.accept()
    client.close()
    assert conn.recv(1) == b""
    conn.close()
    listener.close()


@pytest.mark.parametrize(
    "kw",
    [
        {"guest_cid": 2, "uds_path": "/tmp/x"},
        {"guest_cid": 3, "uds_path": ""},
        {"guest_cid": 3, "uds_path": "/" + "x" * 120},
        {"guest_cid": 3, "uds_path": "/tmp/x", "buf_alloc": 10},
    ],
)
def test_config_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        VsockConfig(**kw)  # type: ignore[arg-type]


def test_cli_rejects_busy_path(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    vsock_cli.add_arguments(parser)
    args = parser.parse_args(["--uds-path", str(tmp_path / "v"), "--guest-cid", "5"])
    dev = vsock_cli.make_device(args)
    try:
        assert dev.cid == 5
        with pytest.raises(ValueError, match="in use"):
            vsock_cli.make_device(args)
    finally:
        dev.close()
    assert not (tmp_path / "v").exists()


def test_pvbus_serve_vsock_process(tmp_path: Path) -> None:
    vhost = tmp_path / "vhost.sock"
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "vsock", "--socket-path", str(vhost)]
    argv += ["--uds-path", str(tmp_path / "v"), "--guest-cid", "42"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not vhost.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        listener = host_listener(tmp_path / "v_3000")
        with VsockClient.connect_backend(str(vhost)) as client:
            assert client.cid == 42
            stream = client.connect(3000)
            conn, _ = listener.accept()
            conn.sendall(b"x" * 100_000)
            conn.shutdown(socket.SHUT_WR)
            assert client.recv_until_eof(stream) == b"x" * 100_000
        listener.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
