"""Shared fixtures: memfd-backed guest memory, raw images and block devices on temp files."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.vm import GuestBuildError, GuestImage, default_guest


def memfd(size: int, name: str = "pvbus-test") -> int:
    """A memfd of ``size`` bytes (the caller closes it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor (os.fstat raises EBADF otherwise)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 1 MiB raw image whose sector ``n`` is filled with byte ``n % 251``."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([n % 251]) * 512 for n in range(2048)))
    return path


MakeBlk = Callable[..., BlockDevice]


@pytest.fixture
def make_blk(image: Path) -> Iterator[MakeBlk]:
    """Build BlockDevices on ``image`` (keyword arguments go to BlkConfig); closed after."""
    devices: list[BlockDevice] = []

    def make(**kwargs: object) -> BlockDevice:
        kwargs.setdefault("image", str(image))
        device = BlockDevice(BlkConfig(**kwargs))  # type: ignore[arg-type]
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.close()


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The cached guest image for real-VM tests.

    Skipped where QEMU or the guest cannot be had, except in CI (``CI`` set), where
    scripts/install.sh provides both and a skip would hide a broken set-up.
    """
    problem = None
    if shutil.which("qemu-system-x86_64") is None:
        problem = "qemu-system-x86_64 not installed"
    else:
        try:
            return default_guest()
        except GuestBuildError as err:
            problem = f"cannot build the guest: {err}"
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own (root and iproute2), deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    name = f"pvbus-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
