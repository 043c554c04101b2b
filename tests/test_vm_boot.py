"""Boot real guests under QEMU (TCG here) with vhost-user-blk disks. Slow: marked ``vm``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pvbus.vm import DiskSpec, GuestImage, VmConfig, run_command

pytestmark = pytest.mark.vm

SCRIPT = "cat /sys/block/vda/size; echo to-stderr >&2; ls /sys/bus/virtio/drivers; exit 7"


def disk(tmp_path: Path, mib: int = 16) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(mib * 1024 * 1024)
    return path


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="no qemu-storage-daemon")
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_boot_qsd_disk(guest: GuestImage, tmp_path: Path, transport: str) -> None:
    cfg = VmConfig(
        transport=transport, accel="tcg", disks=(DiskSpec(disk(tmp_path)),), disk_backend="qsd"
    )
    chunks: list[bytes] = []
    result = run_command(cfg, [SCRIPT], timeout=120, on_output=chunks.append, guest=guest)
    assert result.status == 7
    lines = result.output.decode().splitlines()
    assert lines[0] == str(16 * 1024 * 2)
    assert "to-stderr" in lines
    assert "virtio_blk" in lines
    assert b"".join(chunks) == result.output
    assert result.boot_seconds is not None


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_pvbus_disk_write_read_back(guest: GuestImage, tmp_path: Path, transport: str) -> None:
    image = disk(tmp_path)
    cfg = VmConfig(transport=transport, accel="tcg", disks=(DiskSpec(image),))
    script = (
        "echo pvbus-was-here | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null;"
        "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -n 1"
    )
    result = run_command(cfg, [script], timeout=120, guest=guest)
    assert result.status == 0, result.output
    assert result.output == b"pvbus-was-here\n"
    with image.open("rb") as f:
        f.seek(8 * 512)
        assert f.read(15) == b"pvbus-was-here\n"
