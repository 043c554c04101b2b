"""No acknowledged write is lost: backend SIGKILLed under a writing guest; power cut.

The guest writes a numbered block stream with O_DIRECT and acknowledges each block once its
write returned; meanwhile the test kills the pvbus backend at random moments, at least five
times. ``pvbus run``'s machinery restarts it on the same socket, QEMU reconnects
(``reconnect-ms``) and hands it the inflight area, and the backend resubmits what was in
flight. The guest must see no I/O error, re-read every block correctly, and the host must
find every acknowledged block in the image exactly as written.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
from pathlib import Path

import pytest

from pvbus.vm import DiskSpec, GuestImage, VmConfig, VmError
from pvbus.vm.runner import Vm, command_script

pytestmark = pytest.mark.vm

BLOCKS = 400
BLOCK = 4096
KILLS = 5

WRITER = f"""
i=0
while [ $i -lt {BLOCKS} ]; do
  printf 'pvbus block %08d\\n' $i | dd of=/dev/vda bs={BLOCK} seek=$i conv=sync oflag=direct \\
    2>/dev/null || {{ echo "ioerror $i"; exit 1; }}
  echo "ack $i"
  i=$((i + 1))
done
bad=0
i=0
while [ $i -lt {BLOCKS} ]; do
  got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/dev/null | head -n 1)
  [ "$got" = "$(printf 'pvbus block %08d' $i)" ] || bad=$((bad + 1))
  i=$((i + 1))
done
echo "reread-bad $bad"
echo "kernel-errors $(dmesg | grep -ciE 'i/o error|blk_update_request|critical')"
"""


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backend_killed_repeatedly_loses_no_acknowledged_write(
    guest: GuestImage, tmp_path: Path, packed: bool
) -> None:
    """With ``packed`` the rings are packed and so is the inflight area (QueueRegionPacked)."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(BLOCKS * BLOCK)
    rng = random.Random(os.getpid())
    # Kill points spread over the stream, at random blocks.
    kill_at = sorted(rng.sample(range(20, BLOCKS - 40), KILLS))
    config = VmConfig(transport="pci", accel="tcg", disks=(DiskSpec(image),), packed=packed)
    vm = Vm(config, command_script([WRITER]), guest=guest)
    output = bytearray()
    kills: list[int] = []

    def watch(data: bytes) -> None:
        output.extend(data)
        acks = re.findall(rb"ack (\d+)", output[-4096:])
        if kill_at and acks and int(acks[-1]) >= kill_at[0]:
            kill_at.pop(0)
            backend = vm.backends[0].process
            if backend.poll() is None:
                os.kill(backend.pid, signal.SIGKILL)
                kills.append(int(acks[-1]))

    with vm:
        result = vm.wait(timeout=600, on_output=watch)
    text = result.output.decode(errors="replace")
    assert len(kills) >= KILLS, (kills, text[-500:])
    assert vm.backend_restarts >= KILLS
    assert "ioerror" not in text, text[-2000:]
    assert result.status == 0, text[-2000:]
    acked = [int(n) for n in re.findall(r"^ack (\d+)$", text, re.M)]
    assert acked == list(range(BLOCKS))
    assert re.search(r"^reread-bad 0$", text, re.M), text[-500:]
    assert re.search(r"^kernel-errors 0$", text, re.M), text[-500:]
    data = image.read_bytes()
    for n in acked:
        block = data[n * BLOCK : (n + 1) * BLOCK]
        want = f"pvbus block {n:08d}\n".encode()
        assert block == want.ljust(BLOCK, b"\0"), f"block {n} lost or damaged"


POWER_CUT = """
ct=$(ls /sys/block/vda/cache_type /sys/block/vda/device/cache_type 2>/dev/null | head -n 1)
echo "default $(cat "$ct")"
echo "write through" > "$ct"
echo "through $(cat "$ct")"
dd if=/dev/urandom of=/tmp/a bs=4k count=16 2>/dev/null
dd if=/tmp/a of=/dev/vda bs=4k oflag=direct 2>/dev/null
echo "wt $(md5sum < /tmp/a | cut -d' ' -f1)"
echo "write back" > "$ct"
dd if=/dev/urandom of=/tmp/b bs=4k count=16 2>/dev/null
dd if=/tmp/b of=/dev/vda bs=4k seek=64 conv=fsync 2>/dev/null
echo "synced $(md5sum < /tmp/b | cut -d' ' -f1)"
sleep 600
"""


def test_power_cut_after_fsync_keeps_every_acknowledged_write(
    guest: GuestImage, tmp_path: Path
) -> None:
    """Both cache modes, switched by the guest; QEMU is killed the moment fsync returned."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    config = VmConfig(transport="pci", accel="tcg", disks=(DiskSpec(image),))
    vm = Vm(config, command_script([POWER_CUT]), guest=guest)
    output = bytearray()

    def watch(data: bytes) -> None:
        output.extend(data)
        if re.search(rb"synced \w+\n", output) and vm.pid is not None:
            os.kill(vm.pid, signal.SIGKILL)

    with vm, pytest.raises(VmError):
        vm.wait(timeout=300, on_output=watch)
    text = output.decode(errors="replace")
    facts = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    assert facts["default"] == "write back", text
    assert facts["through"] == "write through", text
    data = image.read_bytes()
    assert hashlib.md5(data[: 16 * 4096]).hexdigest() == facts["wt"]
    assert hashlib.md5(data[64 * 4096 : 80 * 4096]).hexdigest() == facts["synced"]
