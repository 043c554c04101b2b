"""pvbus devices rendered as virtio-CCW for a real s390x guest (TCG, slow: marked ``vm``).

The guest is big-endian; virtio 1.x rings and headers are little-endian whatever the CPU, so
pvbus's device models serve it unchanged. QEMU 10 has a CCW rendering for the vhost-user
netdev (``virtio-net-ccw``) but none for vhost-user-blk, -rng, -vsock or the generic device:
the disk and rng tests run only with a QEMU that lists ``vhost-user-blk-ccw`` and
``vhost-user-rng-ccw``, and say so when skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pvbus.vm import GuestBuildError, GuestImage, RunResult, Vm, VmConfig, build_guest
from pvbus.vm.devices import DeviceSpec, creatable
from pvbus.vm.qemu import DiskSpec, default_qemu

pytestmark = pytest.mark.vm

QEMU_S390X = default_qemu("ccw")


@pytest.fixture(scope="session")
def s390x_guest() -> GuestImage:
    """The cached s390x guest; skipped without qemu-system-s390x or an s390x dpkg."""
    if shutil.which(QEMU_S390X) is None:
        pytest.skip(f"{QEMU_S390X} not installed (scripts/setup-host.sh installs it)")
    try:
        return build_guest(arch="s390x", progress=None)
    except GuestBuildError as err:
        pytest.skip(f"cannot build the s390x guest: {err}")


@pytest.fixture(scope="session")
def amd64_guest(guest: GuestImage) -> GuestImage:
    return guest


def needs_device(device: str) -> None:
    if not creatable(device, QEMU_S390X):
        pytest.skip(f"{QEMU_S390X} cannot create {device} (QEMU has no CCW proxy for it)")


def run(vm: Vm, timeout: float) -> RunResult:
    try:
        vm.start()
        return vm.wait(timeout)
    finally:
        vm.stop()


# Where a virtio device sits: /sys/devices/css0/0.0.SSSS/0.0.DDDD/virtioN on the CCW bus.
SHOW_DEVICE = (
    "for d in /sys/bus/virtio/devices/*; do "
    "echo dev $(cat $d/device) $(basename $(readlink $d/driver)) $(readlink -f $d) "
    "$(cut -c33 $d/features); done; "
)


def test_s390x_guest_boots_on_ccw(s390x_guest: GuestImage) -> None:
    config = VmConfig(transport="ccw", accel="auto")
    result = run(Vm(config, "uname -m; " + SHOW_DEVICE, guest=s390x_guest), timeout=180)
    out = result.output.decode()
    assert result.status == 0, out
    assert out.startswith("s390x\n")
    # The output port is on virtio-serial-ccw: virtio id 3, under the channel subsystem.
    assert re.search(r"dev 0x0003 virtio_console /sys/devices/css0/0\.0\.\w+/0\.0\.\w+/", out)
    assert result.boot_seconds is not None and result.boot_seconds < 60


SENDER = (
    "ip link set eth0 up && ip addr add 169.254.8.1/16 dev eth0 && "
    "i=0; until ping -c 1 -W 1 169.254.8.2 >/dev/null 2>&1; do "
    "i=$((i+1)); [ $i -gt 120 ] && echo peer-unreachable && exit 3; done; "
    "ping -c 3 169.254.8.2 | grep -o '3 packets received'; "
    "dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null; "
    "echo sent $(md5sum < /tmp/data); "
    "nc -l -p 5000 < /tmp/data; " + SHOW_DEVICE + "uname -m"
)
RECEIVER = (
    "ip link set eth0 up && ip addr add 169.254.8.2/16 dev eth0 && "
    "i=0; until ping -c 1 -W 1 169.254.8.1 >/dev/null 2>&1; do "
    "i=$((i+1)); [ $i -gt 240 ] && echo peer-unreachable && exit 3; done; "
    "mkfifo /tmp/hold; sleep 600 > /tmp/hold & "
    "i=0; until nc 169.254.8.1 5000 < /tmp/hold > /tmp/got; do "
    "i=$((i+1)); [ $i -gt 120 ] && exit 4; sleep 1; done; kill $!; "
    "echo got $(md5sum < /tmp/got) $(wc -c < /tmp/got); uname -m"
)


def test_s390x_guest_and_x86_guest_on_one_pvbus_switch(
    s390x_guest: GuestImage, amd64_guest: GuestImage, tmp_path: Path
) -> None:
    """pvbus net as virtio-net-ccw (big-endian s390x) and virtio-net-pci (x86-64), one switch."""
    needs_device("virtio-net-ccw")
    switch = tmp_path / "switch.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvbus.cli.main", "switch", "--socket-path", str(switch)]
    )
    try:
        deadline = time.monotonic() + 15
        while not switch.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        vms = []
        for name, transport, mac, script, image in (
            ("s390x", "ccw", "52:54:00:08:00:01", SENDER, s390x_guest),
            ("x86", "pci", "52:54:00:08:00:02", RECEIVER, amd64_guest),
        ):
            net = DeviceSpec.parse(f"net:switch={switch},mac={mac}")
            config = VmConfig(transport=transport, accel="tcg", devices=(net,))
            (tmp_path / name).mkdir()
            vms.append(Vm(config, script, guest=image, workdir=tmp_path / name))
        results: dict[str, RunResult | BaseException] = {}

        def wait(name: str, vm: Vm) -> None:
            try:
                results[name] = run(vm, 300)
            except BaseException as err:
                results[name] = err

        threads = [
            threading.Thread(target=wait, args=(n, vm))
            for n, vm in zip(("s390x", "x86"), vms, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(10)
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    sender, receiver = results["s390x"], results["x86"]
    assert isinstance(sender, RunResult) and isinstance(receiver, RunResult)
    a_out, b_out = sender.output.decode(), receiver.output.decode()
    assert sender.status == 0 and a_out.rstrip().endswith("s390x"), a_out
    assert receiver.status == 0 and b_out.rstrip().endswith("x86_64"), b_out
    assert "3 packets received" in a_out
    sent = re.search(r"sent ([0-9a-f]{32})", a_out)
    got = re.search(r"got ([0-9a-f]{32})[ -]+(\d+)", b_out)
    assert sent and got, (a_out, b_out)
    assert got.group(2) == str(4 << 20)
    assert got.group(1) == sent.group(1)
    # The s390x guest's NIC: virtio id 1, virtio_net, on the CCW bus, VIRTIO_F_VERSION_1.
    nic = r"dev 0x0001 virtio_net /sys/devices/css0/0\.0\.\w+/0\.0\.\w+/virtio\d+ 1"
    assert re.search(nic, a_out), a_out


def test_s390x_guest_disk_over_ccw(s390x_guest: GuestImage, tmp_path: Path) -> None:
    """Byte-exact reads and writes of a pvbus disk (needs a QEMU with vhost-user-blk-ccw)."""
    needs_device("vhost-user-blk-ccw")
    disk = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    disk.write_bytes(data + bytes(4 << 20))
    script = (
        SHOW_DEVICE + "echo read $(head -c 4194304 /dev/vda | md5sum); "
        "dd if=/dev/vda of=/dev/vda bs=1M count=4 seek=4 conv=fsync 2>/dev/null; "
        "echo back $(dd if=/dev/vda bs=1M skip=4 count=4 iflag=direct 2>/dev/null | md5sum)"
    )
    config = VmConfig(transport="ccw", accel="tcg", disks=(DiskSpec(disk),))
    result = run(Vm(config, script, guest=s390x_guest), timeout=300)
    out = result.output.decode()
    assert result.status == 0, out
    md5 = hashlib.md5(data).hexdigest()
    assert f"read {md5}" in out and f"back {md5}" in out, out
    assert disk.read_bytes()[4 << 20 :] == data
    assert re.search(r"dev 0x0002 virtio_blk /sys/devices/css0/", out), out


def test_s390x_guest_rng_over_ccw(s390x_guest: GuestImage) -> None:
    """Entropy from pvbus rng (needs a QEMU with vhost-user-rng-ccw)."""
    needs_device("vhost-user-rng-ccw")
    config = VmConfig(transport="ccw", accel="tcg", devices=(DeviceSpec.rng(),))
    script = "head -c 65536 /dev/hwrng | wc -c; cat /sys/class/misc/hw_random/rng_current"
    result = run(Vm(config, script, guest=s390x_guest), timeout=300)
    out = result.output.decode()
    assert result.status == 0 and "65536" in out and "virtio_rng" in out, out
