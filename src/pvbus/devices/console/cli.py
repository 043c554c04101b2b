"""``pvbus serve console``: ports and their host backends to a :class:`ConsoleDevice`."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.devices.console.backends import PortBackend, open_backend
from pvbus.devices.console.device import ConsoleConfig, ConsoleDevice, PortSpec

#: The backend program conventions' capabilities (vhost-user.rst).
CAPABILITIES: dict[str, Any] = {
    "type": "console",
    "features": ["multiport", "emerg-write", "socket", "file", "stdio"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device options of ``pvbus serve console``."""
    parser.add_argument(
        "--port",
        action="append",
        metavar="BACKEND[,name=NAME]",
        help="a port: socket:PATH, file:PATH, stdio or null; the first is the console "
        "(hvc0), later ones need a name (default: one stdio console)",
    )
    parser.add_argument(
        "--multiport", action="store_true", help="offer MULTIPORT even for a single port"
    )
    parser.add_argument("--max-ports", type=int, help="max_nr_ports (default: the ports given)")
    parser.add_argument(
        "--queue-size", type=int, default=1024, help="max queue size (default 1024)"
    )


def make_device(args: argparse.Namespace) -> ConsoleDevice:
    """Build the device and open its backends; raises ValueError with a one-line reason."""
    specs = tuple(PortSpec.parse(text) for text in (args.port or ["stdio"]))
    config = ConsoleConfig(
        ports=specs,
        multiport=True if args.multiport else None,
        max_ports=args.max_ports,
        queue_size=args.queue_size,
    )
    backends: list[PortBackend] = []
    try:
        for spec in specs:
            backends.append(open_backend(spec.backend))
    except ValueError:
        for backend in backends:
            backend.close()
        raise
    return ConsoleDevice(config, backends)
