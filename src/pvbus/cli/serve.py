"""``pvbus serve DEVICE``: serve one device over vhost-user until SIGTERM or SIGINT.

Follows the vhost-user "backend program conventions" (vhost-user.rst): ``--socket-path`` or
``--fd``, and ``--print-capabilities``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
from typing import Any

from pvbus.cli._common import CliError
from pvbus.devices.base import VirtioDevice
from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.server import EventLoop, VhostUserServer, listen_unix

log = logging.getLogger(__name__)

#: Capabilities per device type, as the backend program conventions name them.
CAPABILITIES = {"blk": {"type": "block", "features": ["blk-file", "read-only"]}}


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a virtio device over vhost-user")
    devices = serve.add_subparsers(dest="device", metavar="DEVICE", required=True)
    blk = devices.add_parser("blk", help="virtio-blk over a raw image or block device")
    _common_args(blk)
    blk.add_argument("--image", "--blk-file", dest="image", help="raw image file or block device")
    blk.add_argument(
        "--read-only", action="store_true", help="open read-only, offer VIRTIO_BLK_F_RO"
    )
    blk.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    blk.add_argument("--queue-size", type=int, default=256, help="max queue size (default 256)")
    blk.add_argument("--serial", default="pvbus", help="GET_ID string, at most 20 bytes")
    blk.set_defaults(handler=_serve_blk)


def _common_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="Unix socket to create and listen on")
    where.add_argument("--fd", type=int, help="inherited listening socket fd")
    where.add_argument(
        "--print-capabilities", action="store_true", help="print the backend's capabilities JSON"
    )


def _serve_blk(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES["blk"]))
        return 0
    if args.image is None:
        raise CliError("serve blk: --image is required")
    try:
        config = BlkConfig(
            image=args.image,
            read_only=args.read_only,
            num_queues=args.num_queues,
            queue_size=args.queue_size,
            serial=args.serial,
        )
        device = BlockDevice(config)
    except ValueError as err:
        raise CliError(f"serve blk: {err}") from err
    try:
        return serve(device, args)
    finally:
        device.close()


def serve(device: VirtioDevice, args: argparse.Namespace) -> int:
    """Listen as ``args`` say and serve ``device`` until a signal; remove the socket after."""
    if args.fd is not None:
        try:
            listener = socket.socket(fileno=args.fd)
        except OSError as err:
            raise CliError(f"--fd {args.fd}: {err.strerror}") from err
        path = None
    elif args.socket_path:
        path = args.socket_path
        try:
            listener = listen_unix(path)
        except OSError as err:
            raise CliError(f"cannot listen on {path}: {err.strerror or err}") from err
    else:
        raise CliError("one of --socket-path or --fd is required")
    loop = EventLoop()
    loop.stop_on_signals()
    server = VhostUserServer(device, listener, loop)
    log.info("serving %s on %s", device.name, path or f"fd {args.fd}")
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return 0
