"""``pvbus serve blk``: arguments to a validated :class:`BlkConfig`, then a device."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.devices.blk.device import DEFAULT_IO_THREADS, BlkConfig, BlockDevice

#: The backend program conventions' capabilities (vhost-user.rst).
CAPABILITIES: dict[str, Any] = {"type": "block", "features": ["blk-file", "read-only"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device options of ``pvbus serve blk``."""
    parser.add_argument("--image", "--blk-file", dest="image", help="raw image or block device")
    parser.add_argument(
        "--read-only", action="store_true", help="open read-only, offer VIRTIO_BLK_F_RO"
    )
    parser.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    parser.add_argument(
        "--queue-size", type=int, default=1024, help="max queue size (default 1024)"
    )
    parser.add_argument("--serial", default="pvbus", help="GET_ID string, at most 20 bytes")
    parser.add_argument(
        "--io-threads",
        type=int,
        default=DEFAULT_IO_THREADS,
        help="threads for reads and writes of 128 KiB or more, 0 to do all I/O in the event "
        f"loop (default {DEFAULT_IO_THREADS})",
    )


def make_device(args: argparse.Namespace) -> BlockDevice:
    """Build the device; raises ValueError with a one-line reason."""
    if args.image is None:
        raise ValueError("--image is required")
    config = BlkConfig(
        image=args.image,
        read_only=args.read_only,
        num_queues=args.num_queues,
        queue_size=args.queue_size,
        serial=args.serial,
        io_threads=args.io_threads,
    )
    return BlockDevice(config)
