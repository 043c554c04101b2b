"""The userspace block client against real backends: a pvbus server thread, a ``pvbus serve
blk`` process and qemu-storage-daemon, each on a real image file, checked against an
in-memory model of the disk."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.frontend import (
    AsyncBlockClient,
    BackendDisconnectedError,
    BlockClient,
    BlockError,
    Completion,
    FrontendError,
    Status,
)
from pvbus.frontend.blk import DRIVER_FEATURES
from pvbus.server import VhostUserServer
from pvbus.testing import ServedDevice
from pvbus.vhost_user.backend import BACKEND_PROTOCOL_FEATURES, BackendSession
from pvbus.vhost_user.messages import ProtocolFeature, Request
from pvbus.virtio.blk import F_FLUSH
from pvbus.virtio.constants import F_EVENT_IDX, F_RING_PACKED, bit
from pvbus.virtio.packed_driver import PackedDriverQueue

DISK = 4 << 20
QSD = shutil.which("qemu-storage-daemon")


class ServerThread(ServedDevice):
    """A pvbus vhost-user-blk server on an event loop in a thread, offering only
    ``protocol_features``."""

    device: BlockDevice

    def __init__(
        self, sock_path: Path, image: Path, protocol_features: int, **config: object
    ) -> None:
        proto = protocol_features

        class Server(VhostUserServer):
            def _accept(self) -> None:
                super()._accept()
                if self.session is not None:
                    self.session = BackendSession(self.device, self, protocol_features=proto)

        device = BlockDevice(BlkConfig(str(image), **config))  # type: ignore[arg-type]
        super().__init__(device, sock_path, server=Server)

    def stop(self) -> None:
        self.close()


def make_image(path: Path, size: int = DISK) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, "backend exited"
        assert time.monotonic() < deadline, "backend did not listen"
        time.sleep(0.02)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def pvbus_thread(tmp_path: Path, image: Path) -> Iterator[Path]:
    sock = tmp_path / "blk.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES)
    yield sock
    server.stop()


@pytest.fixture
def pvbus_process(tmp_path: Path, image: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    sock = tmp_path / "proc.sock"
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "blk"]
    proc = subprocess.Popen([*argv, "--socket-path", str(sock), "--image", str(image)])
    wait_for_socket(sock, proc)
    yield sock, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    proc.wait(10)


@pytest.fixture
def qsd(tmp_path: Path, image: Path) -> Iterator[Path]:
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    sock = tmp_path / "qsd.sock"
    proc = subprocess.Popen(
        [
            QSD,
            "--blockdev",
            f"driver=file,node-name=f0,filename={image}",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
        ]
    )
    wait_for_socket(sock, proc)
    yield sock
    proc.terminate()
    proc.wait(10)


# -- random mixed I/O against a model --------------------------------------------------------


def check_against_model(client: BlockClient, image: Path, seed: int, discard_zeroes: bool) -> None:
    """Random batches of non-overlapping reads, writes, zeroes and discards, many in flight."""
    rng = random.Random(seed)
    model = bytearray(DISK)
    known = bytearray(b"\1") * DISK  # 0 where a discard left the contents undefined
    chunk = 64 << 10
    q = client.queues[0]
    for _ in range(12):
        chunks = rng.sample(range(DISK // chunk), rng.randint(1, 24))
        expected_reads: dict[int, tuple[int, int]] = {}
        for tag, c in enumerate(chunks):
            start = c * chunk + rng.randrange(0, chunk // 512) * 512
            length = rng.randint(1, (c * chunk + chunk - start) // 512) * 512
            op = rng.choice(["read", "write", "write", "zeroes", "discard"])
            if op == "read":
                q.submit_read(start, length, tag)
                expected_reads[tag] = (start, length)
            elif op == "write":
                data = rng.randbytes(length)
                q.submit_write(start, data, tag)
                model[start : start + length] = data
                known[start : start + length] = b"\1" * length
            elif op == "zeroes":
                q.submit_write_zeroes(start, length, unmap=rng.random() < 0.5, tag=tag)
                model[start : start + length] = bytes(length)
                known[start : start + length] = b"\1" * length
            else:
                q.submit_discard(start, length, tag)
                if discard_zeroes:
                    model[start : start + length] = bytes(length)
                else:
                    known[start : start + length] = bytes(length)
        q.kick()
        done: list[Completion] = []
        while len(done) < len(chunks):
            done += q.wait(len(chunks) - len(done), timeout=10)
        assert sorted(d.tag for d in done) == list(range(len(chunks)))
        for d in done:
            d.check()
            if d.tag in expected_reads:
                start, length = expected_reads[d.tag]
                assert d.data is not None
                got = bytearray(d.data)
                want = bytearray(model[start : start + length])
                for i in range(length):  # undefined after discard: ignore those bytes
                    if not known[start + i]:
                        got[i] = want[i] = 0
                assert got == want, f"read {start}+{length} differs"
    client.flush()
    on_disk = bytearray(image.read_bytes())
    for i in range(DISK):
        if not known[i]:
            on_disk[i] = model[i] = 0
    assert on_disk == model


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_random_io_pvbus_thread(pvbus_thread: Path, image: Path, packed: bool) -> None:
    with BlockClient.connect(str(pvbus_thread), packed=packed) as client:
        assert client.capacity == DISK
        assert bool(client.features & bit(F_RING_PACKED)) == packed
        check_against_model(client, image, seed=1, discard_zeroes=True)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_random_io_pvbus_process(
    pvbus_process: tuple[Path, subprocess.Popen[bytes]], image: Path, packed: bool
) -> None:
    sock, proc = pvbus_process
    with BlockClient.connect(str(sock), packed=packed) as client:
        assert client.frontend.backend_pid == proc.pid
        assert isinstance(client.queues[0].ring, PackedDriverQueue) == packed
        check_against_model(client, image, seed=2, discard_zeroes=True)


def test_random_io_qsd(qsd: Path, image: Path) -> None:
    with BlockClient.connect(str(qsd)) as client:
        assert client.capacity == DISK
        check_against_model(client, image, seed=3, discard_zeroes=False)


def test_packed_rings_from_a_backend_without_them_is_a_clear_error(qsd: Path) -> None:
    """qemu-storage-daemon (libvhost-user) has split rings only."""
    with pytest.raises(FrontendError, match="does not offer VIRTIO_F_RING_PACKED"):
        BlockClient.connect(str(qsd), packed=True)


@pytest.mark.parametrize("backend", ["pvbus_thread", "qsd"])
def test_sync_api(backend: str, request: pytest.FixtureRequest, image: Path) -> None:
    sock: Path = request.getfixturevalue(backend)
    with BlockClient.connect(str(sock)) as client:
        client.write(8192, b"a" * 1024)
        assert client.read(8192, 1024) == b"a" * 1024
        client.write_zeroes(8192, 512)
        assert client.read(8192, 1024) == bytes(512) + b"a" * 512
        client.flush()
        buf = client.alloc_buffer(4096)
        buf.view[:] = b"z" * 4096
        client.write(0, buf)
        buf.view[:] = bytes(4096)
        client.readinto(0, buf)
        assert bytes(buf.view) == b"z" * 4096
        client.free_buffer(buf)
        assert client.get_id() in ("pvbus", "vhost_user_blk")
        # Larger than pvbus's size_max (1 MiB): split over several descriptors.
        big = os.urandom(3 << 20)
        client.write(512, big)
        assert client.read(512, 3 << 20) == big
        with pytest.raises(ValueError, match="multiples"):
            client.read(100, 512)
        with pytest.raises(ValueError, match="beyond"):
            client.read(DISK, 512)
    assert image.read_bytes()[512 : 512 + len(big)] == big


# -- errors carry the virtio status ----------------------------------------------------------


def test_read_only_write_fails_with_ioerr(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "ro.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES, read_only=True)
    try:
        with BlockClient.connect(str(sock)) as client:
            assert client.read_only
            with pytest.raises(BlockError) as info:
                client.write(0, bytes(512))
            assert info.value.status == Status.IOERR
    finally:
        server.stop()


def test_unsupported_discard_fails_with_unsupp(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "nd.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES, discard=False)
    try:
        with BlockClient.connect(str(sock)) as client:
            with pytest.raises(BlockError) as info:
                client.discard(0, 4096)
            assert info.value.status == Status.UNSUPP
            assert "UNSUPP" in str(info.value)
    finally:
        server.stop()


# -- negotiation edge cases ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dropped",
    [ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ],
)
def test_backend_without_protocol_feature(tmp_path: Path, image: Path, dropped: int) -> None:
    sock = tmp_path / "np.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES & ~(1 << dropped))
    try:
        with BlockClient.connect(str(sock)) as client:
            fe = client.frontend
            assert not fe.has(ProtocolFeature(dropped))
            if dropped == ProtocolFeature.CONFIG:
                assert client.capacity is None  # no config space: size unknown
            else:
                assert client.capacity == DISK
            client.write(0, b"q" * 512)
            assert client.read(0, 512) == b"q" * 512
    finally:
        server.stop()
    assert image.read_bytes()[:512] == b"q" * 512


def test_backend_without_protocol_features_at_all(tmp_path: Path, image: Path) -> None:
    """A frontend that wants no protocol features: rings start enabled with the kick fd."""
    sock = tmp_path / "n0.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES)
    try:
        with BlockClient.connect(str(sock), protocol_features=0) as client:
            assert client.frontend.session.protocol_features == 0
            client.write(512, b"r" * 512)
            assert client.read(512, 512) == b"r" * 512
    finally:
        server.stop()


def test_without_event_idx_and_flush(pvbus_thread: Path) -> None:
    features = DRIVER_FEATURES & ~bit(F_EVENT_IDX) & ~bit(F_FLUSH)
    with BlockClient.connect(str(pvbus_thread), driver_features=features) as client:
        assert not client.features & bit(F_EVENT_IDX)
        assert not client.queues[0].ring.event_idx
        q = client.queues[0]
        for i in range(16):
            q.submit_write(i * 512, bytes([i]) * 512, i)
        q.kick()
        done: list[Completion] = []
        while len(done) < 16:
            done += q.wait(16 - len(done), timeout=10)
        client.flush()  # a no-op without VIRTIO_BLK_F_FLUSH
        assert client.read(15 * 512, 512) == bytes([15]) * 512


def test_more_queues_than_the_backend_has(pvbus_thread: Path) -> None:
    with pytest.raises(FrontendError, match="queues"):
        BlockClient.connect(str(pvbus_thread), num_queues=2)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_multiqueue(tmp_path: Path, image: Path, packed: bool) -> None:
    sock = tmp_path / "mq.sock"
    server = ServerThread(sock, image, BACKEND_PROTOCOL_FEATURES, num_queues=2)
    try:
        with BlockClient.connect(str(sock), num_queues=2, packed=packed) as client:
            for i, q in enumerate(client.queues):
                q.submit_write(i * 4096, bytes([i + 1]) * 4096, i)
                q.kick()
            for q in client.queues:
                assert len(q.wait(1, timeout=10)) == 1
            assert client.read(4096, 4096) == b"\2" * 4096
    finally:
        server.stop()


def test_nothing_listening(tmp_path: Path) -> None:
    with pytest.raises(FrontendError, match="cannot connect"):
        BlockClient.connect(str(tmp_path / "nobody.sock"))


def test_backend_that_is_not_vhost_user(tmp_path: Path) -> None:
    """A peer that answers garbage: a clear protocol error, not a hang."""
    path = tmp_path / "junk.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def junk() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"\0\0\0\0\x00\x00\x08\x00\x00\x00" + bytes(8))
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=junk)
    t.start()
    try:
        with pytest.raises(FrontendError, match="protocol error"):
            BlockClient.connect(str(path), timeout=5)
    finally:
        t.join(5)
        listener.close()


# -- a backend that dies ---------------------------------------------------------------------


def test_backend_dies_mid_request(pvbus_process: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = pvbus_process
    client = BlockClient.connect(str(sock))
    try:
        client.write(0, b"w" * 4096)
        proc.send_signal(signal.SIGSTOP)  # the request below is in flight when it dies
        q = client.queues[0]
        q.submit_read(0, 4096, "lost")
        q.kick()
        assert q.wait(1, timeout=0.2) == []  # stopped: nothing completes, no error yet
        proc.kill()
        with pytest.raises(BackendDisconnectedError, match="closed the connection"):
            q.wait(1, timeout=30)
        with pytest.raises(FrontendError):
            client.frontend.request(Request.GET_FEATURES)
    finally:
        client.close()


# -- asyncio ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "packed"), [("pvbus_thread", False), ("pvbus_thread", True), ("qsd", False)]
)
def test_async_many_in_flight(backend: str, packed: bool, request: pytest.FixtureRequest) -> None:
    sock: Path = request.getfixturevalue(backend)

    async def main() -> None:
        connect = AsyncBlockClient.connect(str(sock), queue_size=16, packed=packed)
        async with await connect as client:
            # 64 writes through a 16-entry queue: waits for room, one kick per loop pass.
            await asyncio.gather(*(client.write(i * 4096, bytes([i]) * 4096) for i in range(64)))
            got = await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(64)))
            assert got == [bytes([i]) * 4096 for i in range(64)]
            await client.flush()
            await client.write_zeroes(0, 4096)
            assert await client.read(0, 4096) == bytes(4096)
            assert await client.get_id()
            q = client.client.queues[0]
            assert q.fq.kicks < q.submitted

    asyncio.run(main())


def test_async_backend_dies(pvbus_process: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = pvbus_process

    async def main() -> None:
        client = await AsyncBlockClient.connect(str(sock))
        try:
            await client.write(0, bytes(512))
            proc.send_signal(signal.SIGSTOP)
            pending = asyncio.ensure_future(client.read(0, 512))
            await asyncio.sleep(0.05)
            assert not pending.done()
            proc.kill()
            with pytest.raises(BackendDisconnectedError):
                await asyncio.wait_for(pending, 30)
            with pytest.raises(BackendDisconnectedError):
                await client.read(0, 512)
        finally:
            await client.close()

    asyncio.run(main())


# -- large requests (pvbus completes them on I/O threads) -----------------------------------


@pytest.mark.parametrize("backend", ["pvbus_thread", "qsd"])
def test_large_requests_in_flight(
    backend: str, request: pytest.FixtureRequest, image: Path
) -> None:
    sock: Path = request.getfixturevalue(backend)
    rng = random.Random(7)
    size = 256 << 10
    with BlockClient.connect(str(sock), memory_size=32 << 20) as client:
        q = client.queues[0]
        datas = [rng.randbytes(size) for _ in range(12)]
        for i, data in enumerate(datas):
            q.submit_write(i * size, data, i)
        q.submit_write(12 * size, b"s" * 4096, "small")  # small ones complete inline, first
        q.kick()
        done: list[Completion] = []
        while len(done) < 13:
            done += q.wait(13 - len(done), timeout=10)
        assert all(d.ok for d in done)
        for i in range(12):
            q.submit_read(i * size, size, i)
        q.kick()
        done = []
        while len(done) < 12:
            done += q.wait(12 - len(done), timeout=10)
        assert {d.tag: d.data for d in done} == dict(enumerate(datas))
        # Disconnect with large requests in flight: the backend waits for them, then resets.
        for i in range(8):
            q.submit_read(i * size, size, i)
        q.kick()
    assert image.read_bytes()[: 12 * size] == b"".join(datas)
    with BlockClient.connect(str(sock)) as client:  # the backend took the next connection
        assert client.read(0, 512) == datas[0][:512]
