"""``pvbus demo``: boot a guest on a temporary disk served by pvbus and show what it sees."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from pvbus.cli.run import add_vm_options, run_in_guest, vm_config
from pvbus.vm.qemu import DiskSpec

#: What the guest runs: list virtio devices, inspect /dev/vda, write and read back, ext4.
DEMO_SCRIPT = r"""
echo "== virtio devices in the guest"
for d in /sys/bus/virtio/devices/*; do
  drv=$(readlink "$d/driver"); echo "  ${d##*/}: device id $(cat "$d/device"), driver ${drv##*/}"
done
echo "== /dev/vda"
echo "  size: $(cat /sys/block/vda/size) sectors of 512 bytes, read-only: $(cat /sys/block/vda/ro)"
echo "  queues: $(ls /sys/block/vda/mq | wc -l)"
echo "== raw write + read back at sector 2048"
echo "hello from the pvbus guest" | dd of=/dev/vda bs=512 seek=2048 conv=sync,fsync 2>/dev/null
echo "  read back: $(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
echo "== ext4 on /dev/vdb"
mke2fs -q -b 4096 /dev/vdb >/dev/null && mount -t ext4 /dev/vdb /mnt &&
  echo "written in the guest" > /mnt/hello.txt && sync && cat /mnt/hello.txt &&
  df -k /mnt | tail -n 1 && umount /mnt && echo "  unmounted cleanly"
"""


def register(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="boot a guest on a temporary pvbus disk and show what it sees"
    )
    add_vm_options(demo)
    demo.add_argument("--size", type=int, default=64, metavar="MiB", help="disk size")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="pvbus-demo-") as tmp:
        raw = Path(tmp) / "raw.img"
        fs = Path(tmp) / "fs.img"
        for image in (raw, fs):
            with image.open("wb") as f:
                f.truncate(args.size * 1024 * 1024)
        config = vm_config(args, (DiskSpec(raw), DiskSpec(fs)))
        print(
            f"pvbus: booting a guest ({config.transport}, {config.machine_type}) with two "
            f"{args.size} MiB disks served by {config.disk_backend}",
            file=sys.stderr,
            flush=True,
        )
        status = run_in_guest(config, [DEMO_SCRIPT], args.timeout)
        with raw.open("rb") as f:
            f.seek(2048 * 512)
            line = f.read(512).split(b"\n", 1)[0].decode(errors="replace")
        print("== the host reads the image at sector 2048")
        print(f"  {line}")
        return status
