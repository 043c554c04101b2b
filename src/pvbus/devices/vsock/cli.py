"""``pvbus serve vsock``: arguments to a validated :class:`VsockConfig`, then a device."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.devices.vsock.device import VsockConfig, VsockDevice

#: The backend program conventions' capabilities (vhost-user.rst).
CAPABILITIES: dict[str, Any] = {"type": "vsock", "features": ["stream", "uds-path"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device options of ``pvbus serve vsock``."""
    parser.add_argument("--guest-cid", type=int, default=3, help="the guest's CID (default 3)")
    parser.add_argument(
        "--uds-path",
        help="host Unix socket: host processes connect here and write 'CONNECT <port>'; "
        "guest connections to host port P go to PATH_P",
    )
    parser.add_argument(
        "--buf-alloc", type=int, default=256 * 1024, help="receive buffer per connection"
    )
    parser.add_argument(
        "--queue-size", type=int, default=1024, help="max queue size (default 1024)"
    )


def make_device(args: argparse.Namespace) -> VsockDevice:
    """Build the device (and its listening socket); raises ValueError with a one-line reason."""
    config = VsockConfig(
        guest_cid=args.guest_cid,
        uds_path=args.uds_path or "",
        buf_alloc=args.buf_alloc,
        queue_size=args.queue_size,
    )
    return VsockDevice(config)
