"""End-to-end: unmodified Linux guests under QEMU (TCG) on disks pvbus serves (issue: core).

One boot per transport checks many things at once, to keep the slow set small: O_DIRECT and
buffered+fsync writes land byte-exact in the image, a host-written pattern reads back, a
read-only disk refuses writes and stays unchanged, an ext4 file system made on the host mounts
with matching checksums, three disks at once, a 2-queue disk in a 2-vCPU guest. A last test
kills QEMU under a running backend and boots a new QEMU against it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvbus.vm import (
    DiskSpec,
    GuestImage,
    VmConfig,
    VmError,
    run_command,
)
from pvbus.vm.runner import Vm, command_script

pytestmark = pytest.mark.vm
MiB = 1 << 20


def _image(path: Path, mib: int, fill: bytes | None = None, at: int = 0) -> Path:
    with path.open("wb") as f:
        f.truncate(mib * MiB)
        if fill is not None:
            f.seek(at)
            f.write(fill)
    return path


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _read(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


GUEST_SCRIPT = r"""
set -e
dd if=/dev/urandom of=/tmp/p1 bs=1M count=1 2>/dev/null
dd if=/tmp/p1 of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null
dd if=/dev/urandom of=/tmp/p2 bs=64k count=16 2>/dev/null
dd if=/tmp/p2 of=/dev/vda bs=64k seek=64 2>/dev/null
sync
echo "direct $(md5sum < /tmp/p1 | cut -d' ' -f1)"
echo "buffered $(md5sum < /tmp/p2 | cut -d' ' -f1)"
echo "host $(dd if=/dev/vda bs=1M skip=8 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "ro-flag $(cat /sys/block/vdb/ro)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
  echo "ro-write accepted"
else
  echo "ro-write refused"
fi
echo "ro-read $(dd if=/dev/vdb bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
mount -t ext4 -o ro /dev/vdc /mnt
for f in /mnt/data/*; do echo "file ${f##*/} $(md5sum < "$f" | cut -d' ' -f1)"; done
umount /mnt
echo "queues $(ls /sys/block/vda/mq | wc -l) cpus $(nproc)"
"""


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_guest_io(guest: GuestImage, tmp_path: Path, transport: str) -> None:
    host_pattern = os.urandom(MiB)
    rw = _image(tmp_path / "rw.img", 16, host_pattern, 8 * MiB)
    ro_content = os.urandom(MiB)
    ro = _image(tmp_path / "ro.img", 4, ro_content)
    src = tmp_path / "src" / "data"
    src.mkdir(parents=True)
    files = {f"f{i}.bin": os.urandom(1000 + 37 * i * i) for i in range(5)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    fs = tmp_path / "fs.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(src.parent), str(fs), "16M"],
        check=True,
        capture_output=True,
    )
    config = VmConfig(
        transport=transport,
        accel="tcg",
        cpus=2,
        disks=(
            DiskSpec(rw, num_queues=2),
            DiskSpec(ro, read_only=True),
            DiskSpec(fs, read_only=True),
        ),
    )
    result = run_command(config, [GUEST_SCRIPT], timeout=240, guest=guest)
    out = result.output.decode(errors="replace")
    assert result.status == 0, out
    facts = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    # Guest writes, found byte-exact by the host.
    assert facts["direct"] == _md5(_read(rw, 1 * MiB, MiB))
    assert facts["buffered"] == _md5(_read(rw, 4 * MiB, MiB))
    # A host-written pattern, read in the guest with O_DIRECT.
    assert facts["host"] == _md5(host_pattern)
    # The read-only disk: flagged, writes refused, content intact and readable.
    assert facts["ro-flag"] == "1"
    assert facts["ro-write"] == "refused"
    assert facts["ro-read"] == _md5(ro_content)
    assert _read(ro, 0, MiB) == ro_content
    # ext4 made on the host: every file's checksum matches.
    seen = dict(re.findall(r"^file (\S+) (\S+)$", out, re.M))
    assert seen == {name: _md5(data) for name, data in files.items()}
    # Two request queues, two vCPUs.
    assert facts["queues"] == "2 cpus 2"


def _serve(image: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pvbus.cli.main",
                "-v",
                "serve",
                "blk",
                "--socket-path",
                str(sock),
                "--image",
                str(image),
                "--queue-size",
                "1024",
            ],
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "backend did not listen"
        time.sleep(0.05)
    return proc


def test_qemu_killed_and_restarted(guest: GuestImage, tmp_path: Path) -> None:
    """A frontend killed mid-run leaves the backend serving; the next QEMU works on it."""
    image = _image(tmp_path / "disk.img", 16)
    sock = tmp_path / "blk.sock"
    log = tmp_path / "serve.log"
    backend = _serve(image, sock, log)
    try:
        disk = DiskSpec(image, socket=sock)
        config = VmConfig(transport="pci", accel="tcg", disks=(disk,))
        first = (
            "dd if=/dev/urandom of=/tmp/a bs=64k count=8 2>/dev/null;"
            " dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null;"
            ' echo "written $(md5sum < /tmp/a | cut -d" " -f1)";'
            " while true; do dd if=/dev/vda of=/dev/null bs=4k count=64 iflag=direct"
            " 2>/dev/null; done"
        )
        seen = bytearray()
        vm = Vm(config, command_script([first]), guest=guest)

        def kill_when_written(data: bytes) -> None:
            seen.extend(data)
            if b"written" in seen and b"\n" in seen.split(b"written", 1)[1]:
                assert vm.pid is not None
                os.kill(vm.pid, signal.SIGKILL)

        vm.start()
        try:
            with pytest.raises(VmError) as died:
                vm.wait(timeout=180, on_output=kill_when_written)
        finally:
            vm.stop()
        assert b"written " in seen, f"{died.value}: {seen!r}"
        written = seen.decode().split("written ", 1)[1].split()[0]
        assert written == _md5(_read(image, 0, 512 * 1024))
        assert backend.poll() is None, "the backend died with its frontend"

        second = "dd if=/dev/vda bs=64k count=8 iflag=direct 2>/dev/null | md5sum"
        result = run_command(config, [second], timeout=180, guest=guest)
        assert result.status == 0
        assert result.output.decode().split()[0] == written
        assert backend.poll() is None
    finally:
        backend.send_signal(signal.SIGTERM)
        assert backend.wait(10) == 0
    assert not sock.exists()
    assert log.read_text().count("frontend connected") == 2
