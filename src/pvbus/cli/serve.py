"""``pvbus serve DEVICE``: serve one device over vhost-user until SIGTERM or SIGINT.

Follows the vhost-user "backend program conventions" (vhost-user.rst): ``--socket-path`` or
``--fd``, and ``--print-capabilities``. Each device type contributes a module
``pvbus.devices.<type>.cli`` with ``CAPABILITIES``, ``add_arguments(parser)`` and
``make_device(args)``; this module only wires them to the server.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import socket
from typing import Any

from pvbus.cli._common import CliError
from pvbus.devices.base import VirtioDevice
from pvbus.server import EventLoop, VhostUserServer, listen_unix
from pvbus.vhost_user.backend import Limits

log = logging.getLogger(__name__)

#: Device types ``pvbus serve`` knows, each with a ``pvbus.devices.<type>.cli`` module.
DEVICE_TYPES = ("blk", "net", "rng", "console", "vsock")

_DEFAULT = Limits()

_HELP = {
    "blk": "virtio-blk over a raw image or block device",
    "net": "virtio-net over a tap, a pvbus switch or a stream socket",
    "rng": "virtio-rng from getrandom(2), optionally rate-limited",
    "console": "virtio-console ports on Unix sockets, log files or the terminal",
    "vsock": "virtio-vsock with guest ports mapped to host Unix sockets",
}


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a virtio device over vhost-user")
    devices = serve.add_subparsers(dest="device", metavar="DEVICE", required=True)
    for name in DEVICE_TYPES:
        module = importlib.import_module(f"pvbus.devices.{name}.cli")
        parser = devices.add_parser(name, help=_HELP.get(name, f"virtio-{name}"))
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--socket-path", help="Unix socket to create and listen on")
        where.add_argument("--fd", type=int, help="inherited listening socket fd")
        where.add_argument(
            "--print-capabilities",
            action="store_true",
            help="print the backend's capabilities JSON and exit",
        )
        limits = parser.add_argument_group("limits on what a frontend may make us hold")
        limits.add_argument(
            "--max-mem-slots",
            type=int,
            default=_DEFAULT.max_mem_slots,
            help=f"memory regions (default {_DEFAULT.max_mem_slots})",
        )
        limits.add_argument(
            "--max-memory",
            type=int,
            default=_DEFAULT.max_memory >> 20,
            metavar="MiB",
            help=f"guest memory to map, in MiB (default {_DEFAULT.max_memory >> 20})",
        )
        module.add_arguments(parser)
        parser.set_defaults(handler=_serve, device_module=module)


def _serve(args: argparse.Namespace) -> int:
    module = args.device_module
    if args.print_capabilities:
        print(json.dumps(module.CAPABILITIES))
        return 0
    try:
        device: VirtioDevice = module.make_device(args)
    except ValueError as err:
        raise CliError(f"serve {args.device}: {err}") from err
    try:
        return serve(device, args)
    finally:
        close = getattr(device, "close", None)
        if close is not None:
            close()


def serve(device: VirtioDevice, args: argparse.Namespace) -> int:
    """Listen as ``args`` say and serve ``device`` until a signal; remove the socket after."""
    try:
        limits = Limits(
            max_mem_slots=getattr(args, "max_mem_slots", _DEFAULT.max_mem_slots),
            max_memory=getattr(args, "max_memory", _DEFAULT.max_memory >> 20) << 20,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    if args.fd is not None:
        try:
            listener = socket.socket(fileno=args.fd)
        except OSError as err:
            raise CliError(f"--fd {args.fd}: {err.strerror}") from err
        if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener.close()
            raise CliError(f"--fd {args.fd}: not a listening socket")
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
    server = VhostUserServer(device, listener, loop, limits)
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
