"""RngClient against the pvbus rng backend over real vhost-user sockets on memfd memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvbus.devices.rng import RngConfig, RngDevice
from pvbus.frontend.rng import RngClient
from pvbus.testing import ServedDevice


class Served(ServedDevice):
    """An RngDevice served on a Unix socket by an event loop thread."""

    device: RngDevice

    def __init__(self, path: str, config: RngConfig) -> None:
        super().__init__(RngDevice(config), path)


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "rng.sock")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_read_entropy(sock: str, packed: bool) -> None:
    served = Served(sock, RngConfig())
    try:
        with RngClient.connect(sock, queue_size=16, buffer_size=1024, packed=packed) as client:
            a = client.read(100_000)
            b = client.read(100_000)
        assert len(a) == len(b) == 100_000
        assert a != b
        # Crude sanity: every byte value shows up in 100 kB of real entropy.
        assert len(set(a)) == 256
        assert served.device.bytes_served >= 200_000
    finally:
        served.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rate_limited_read_completes_through_timers(sock: str, packed: bool) -> None:
    served = Served(sock, RngConfig(rate=200_000, burst=4096))
    try:
        with RngClient.connect(sock, queue_size=8, buffer_size=4096, packed=packed) as client:
            data = client.read(40_000, timeout=30)
        assert len(data) == 40_000
    finally:
        served.close()


def test_malformed_chains_are_answered_and_device_survives(sock: str) -> None:
    served = Served(sock, RngConfig())
    try:
        with RngClient.connect(sock) as client:
            assert client.raw([b"read-only"], []) == (0, [])
            length, (buf,) = client.raw([b"x"], [32])
            assert length == 32 and buf != bytes(32)
            assert client.raw([], [0]) == (0, [b""])
            assert len(client.read(5000)) == 5000
    finally:
        served.close()


def test_pvbus_serve_rng_process(tmp_path: Path) -> None:
    path = tmp_path / "rng.sock"
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "rng", "--socket-path", str(path)]
    proc = subprocess.Popen([*argv, "--rate-limit", "1000000"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with RngClient.connect(str(path)) as client:
            assert len(client.read(1 << 16)) == 1 << 16
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not path.exists()


def test_serve_rng_rejects_bad_rate(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "rng"]
    argv += ["--socket-path", str(tmp_path / "s"), "--rate-limit", "-1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "rate limit" in proc.stderr
