"""``pvbus daemon``: host devices and VMs, serve the bus API on a Unix socket (foreground)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pvbus.cli._common import CliError


def register(sub: Any) -> None:
    from pvbus.bus.client import default_api_socket

    p = sub.add_parser(
        "daemon",
        help="run the PV bus daemon (devices, VMs, hot-plug, events, stats, REST API)",
        description="Run the PV bus daemon in the foreground until SIGTERM or SIGINT.",
    )
    p.add_argument(
        "--api-socket",
        type=Path,
        default=default_api_socket(),
        help="Unix socket of the API, mode 0600 (default: %(default)s)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        help="where device sockets and VM files live (default: the API socket's directory)",
    )
    p.set_defaults(handler=_daemon)


def _daemon(args: argparse.Namespace) -> int:
    from pvbus.bus.daemon import run_daemon, setup_logging

    setup_logging(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        return run_daemon(args.api_socket, args.run_dir)
    except OSError as err:
        raise CliError(f"daemon: {err.strerror or err}") from err
