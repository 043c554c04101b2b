"""Shared fixtures: memfd-backed guest memory, raw images and block devices on temp files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvbus.devices.blk import BlkConfig, BlockDevice


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
