"""``pvbus serve rng``: arguments to a validated :class:`RngConfig`, then a device."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.devices.rng.device import RngConfig, RngDevice

#: The backend program conventions' capabilities (vhost-user.rst).
CAPABILITIES: dict[str, Any] = {"type": "rng", "features": ["rate-limit"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device options of ``pvbus serve rng``."""
    parser.add_argument(
        "--rate-limit",
        type=int,
        metavar="BYTES_PER_S",
        help="most bytes per second (default: no limit)",
    )
    parser.add_argument(
        "--burst", type=int, metavar="BYTES", help="token bucket size (default: one second)"
    )
    parser.add_argument(
        "--queue-size", type=int, default=1024, help="max queue size (default 1024)"
    )


def make_device(args: argparse.Namespace) -> RngDevice:
    """Build the device; raises ValueError with a one-line reason."""
    return RngDevice(RngConfig(rate=args.rate_limit, burst=args.burst, queue_size=args.queue_size))
