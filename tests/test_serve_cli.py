"""``pvbus serve blk``: the CLI contract, with real processes and real Unix sockets
(vhost-user.rst "Backend program conventions")."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvbus.vhost_user.messages import U64, Request
from vhost_client import BackendClosedError, VhostUserClient

T_IN, T_OUT, S_OK = 0, 1, 0
PVBUS = [sys.executable, "-m", "pvbus.cli.main"]
WAIT = 20.0


def sector(n: int) -> bytes:
    return bytes([n % 251]) * 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector(n) for n in range(256)))
    return path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"pvbus serve exited {proc.returncode}: {err.decode()}")
        if time.monotonic() > deadline:
            pytest.fail("pvbus serve did not create its socket")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


@pytest.fixture
def serve(tmp_path: Path, image: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "blk.sock"
    proc = subprocess.Popen(
        [*PVBUS, "serve", "blk", "--socket-path", str(sock), "--image", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, proc)
        yield proc, sock
    finally:
        stop(proc, signal.SIGKILL)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_serves_reads_and_writes(
    serve: tuple[subprocess.Popen[bytes], Path], image: Path, packed: bool
) -> None:
    _, sock = serve
    with VhostUserClient(str(sock)) as client:
        client.negotiate(packed=packed)
        assert client.get_u64(Request.GET_QUEUE_NUM) == 1
        client.start_queue(0, size=8)
        for i in range(20):  # past the end of the ring, more than once
            assert client.blk(T_IN, i, read=512) == (S_OK, sector(i))
        assert client.blk(T_IN, 3, read=1024) == (S_OK, sector(3) + sector(4))
        payload = os.urandom(512)
        assert client.blk(T_OUT, 9, payload)[0] == S_OK
        assert client.blk(T_IN, 9, read=512) == (S_OK, payload)
    assert image.read_bytes()[9 * 512 : 10 * 512] == payload


def test_polled_ring_and_two_queues(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "mq.sock"
    proc = subprocess.Popen(
        [
            *PVBUS,
            "serve",
            "blk",
            "--socket-path",
            str(sock),
            "--image",
            str(image),
            "--num-queues",
            "2",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, proc)
        with VhostUserClient(str(sock)) as client:
            client.negotiate()
            assert client.get_u64(Request.GET_QUEUE_NUM) == 2
            client.start_queue(0)
            client.start_queue(1, polled=True)  # no kick fd: the backend polls the ring
            assert client.blk(T_IN, 11, read=512, queue=1) == (S_OK, sector(11))
            assert client.blk(T_IN, 12, read=512, queue=0) == (S_OK, sector(12))
            assert client.blk(T_OUT, 13, b"q" * 512, queue=1)[0] == S_OK
    finally:
        status, err = stop(proc)
    assert status == 0, err
    assert image.read_bytes()[13 * 512 : 14 * 512] == b"q" * 512


def test_one_frontend_at_a_time(serve: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, sock = serve
    first = VhostUserClient(str(sock))
    first.negotiate()
    first.start_queue(0)
    second = VhostUserClient(str(sock))  # waits in the backlog
    second.send(Request.GET_FEATURES)
    assert first.blk(T_IN, 1, read=512) == (S_OK, sector(1))  # the first is still served
    first.close()
    reply = second.recv()  # served once the first has gone
    assert reply.request is Request.GET_FEATURES
    second.negotiate()
    second.start_queue(0)
    assert second.blk(T_IN, 2, read=512) == (S_OK, sector(2))
    second.close()
    # And a third after that.
    with VhostUserClient(str(sock)) as third:
        third.negotiate()
        third.start_queue(0)
        assert third.blk(T_IN, 0, read=512) == (S_OK, sector(0))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # a header with an absurd payload size
        b"\x00" * 12,  # request 0
        bytes.fromhex("01000000050000000000000000"),  # GET_FEATURES with bad version flags
    ],
    ids=["huge-size", "request-0", "bad-version"],
)
def test_protocol_error_closes_that_connection_only(
    serve: tuple[subprocess.Popen[bytes], Path], garbage: bytes
) -> None:
    proc, sock = serve
    with VhostUserClient(str(sock)) as bad:
        bad.negotiate()
        bad.send_raw(garbage)
        with pytest.raises(BackendClosedError):
            bad.recv()
    assert proc.poll() is None
    with VhostUserClient(str(sock)) as good:
        good.negotiate()
        good.start_queue(0)
        assert good.blk(T_IN, 5, read=512) == (S_OK, sector(5))


def test_fds_with_the_wrong_message_close_the_connection(
    serve: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, sock = serve
    with VhostUserClient(str(sock)) as bad:
        fd = os.eventfd(0)
        try:
            bad.send(Request.GET_FEATURES, fds=(fd,))
        finally:
            os.close(fd)
        with pytest.raises(BackendClosedError):
            bad.recv()
    assert proc.poll() is None
    with VhostUserClient(str(sock)) as bad:
        fds = [os.eventfd(0) for _ in range(12)]  # more than any message carries
        try:
            bad.send(Request.SET_VRING_CALL, U64(0), fds=tuple(fds))
        finally:
            for fd in fds:
                os.close(fd)
        with pytest.raises(BackendClosedError):
            bad.recv()
    assert proc.poll() is None
    with VhostUserClient(str(sock)) as good:
        good.negotiate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_0_on_signals_and_removes_its_socket(
    serve: tuple[subprocess.Popen[bytes], Path], sig: int
) -> None:
    proc, sock = serve
    with VhostUserClient(str(sock)) as client:
        client.negotiate()
        client.start_queue(0)
        status, err = stop(proc, sig)
    assert status == 0, err
    assert not sock.exists()


def test_print_capabilities() -> None:
    out = subprocess.run(
        [*PVBUS, "serve", "blk", "--print-capabilities"],
        capture_output=True,
        check=True,
        timeout=WAIT,
    )
    caps = json.loads(out.stdout)
    assert caps["type"] == "block"
    assert set(caps["features"]) <= {"blk-file", "read-only"}
    assert "blk-file" in caps["features"]


def test_inherited_listening_socket(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    fd = listener.fileno()
    proc = subprocess.Popen(
        [*PVBUS, "serve", "blk", "--fd", str(fd), "--image", str(image), "--read-only"],
        pass_fds=[fd],
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        with VhostUserClient(str(path)) as client:
            features = client.negotiate()
            assert features & (1 << 5)  # VIRTIO_BLK_F_RO
            client.start_queue(0)
            assert client.blk(T_IN, 7, read=512) == (S_OK, sector(7))
            assert client.blk(T_OUT, 7, b"x" * 512)[0] == 1  # IOERR: read-only
    finally:
        status, err = stop(proc)
    assert status == 0, err
    assert image.read_bytes()[7 * 512 : 8 * 512] == sector(7)


def run_bad(args: list[str]) -> str:
    proc = subprocess.run([*PVBUS, *args], capture_output=True, timeout=WAIT, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_missing_image(tmp_path: Path) -> None:
    err = run_bad(["serve", "blk", "--socket-path", str(tmp_path / "s")])
    assert "image" in err
    err = run_bad(
        ["serve", "blk", "--socket-path", str(tmp_path / "s"), "--image", str(tmp_path / "no")]
    )
    assert "no" in err
    assert not (tmp_path / "s").exists()


def test_image_size_not_a_multiple_of_512(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    err = run_bad(["serve", "blk", "--socket-path", str(tmp_path / "s"), "--image", str(odd)])
    assert "512" in err


def test_socket_path_in_use(serve: tuple[subprocess.Popen[bytes], Path], image: Path) -> None:
    proc, sock = serve
    err = run_bad(["serve", "blk", "--socket-path", str(sock), "--image", str(image)])
    assert "in use" in err
    assert proc.poll() is None
    assert sock.exists()
    with VhostUserClient(str(sock)) as client:  # the running backend is unharmed
        client.negotiate()


def test_stale_socket_file_is_replaced(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    proc = subprocess.Popen(
        [*PVBUS, "serve", "blk", "--socket-path", str(sock), "--image", str(image)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                client = VhostUserClient(str(sock))
                break
            except (ConnectionRefusedError, FileNotFoundError):  # stale file, or replaced
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with client:
            client.negotiate()
    finally:
        status, err = stop(proc)
    assert status == 0, err


def test_bad_inherited_fd(tmp_path: Path, image: Path) -> None:
    err = run_bad(["serve", "blk", "--fd", "999", "--image", str(image)])
    assert "--fd 999" in err
    with open(image, "rb") as f:  # not a socket
        proc = subprocess.run(
            [*PVBUS, "serve", "blk", "--fd", str(f.fileno()), "--image", str(image)],
            pass_fds=[f.fileno()],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
    assert proc.returncode == 2
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    # A bound socket that does not listen.
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(tmp_path / "bound.sock"))
    with bound:
        fd = bound.fileno()
        proc = subprocess.run(
            [*PVBUS, "serve", "blk", "--fd", str(fd), "--image", str(image)],
            pass_fds=[fd],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.strip() == f"pvbus: --fd {fd}: not a listening socket"
