"""``pvbus switch --socket-path PATH``: run an L2 learning switch for pvbus net ports."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any

from pvbus.cli._common import CliError
from pvbus.devices.net.switch import SwitchServer, listen_seqpacket
from pvbus.server import EventLoop

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "switch",
        help="run an L2 learning switch for pvbus net devices",
        description="Listen on a SOCK_SEQPACKET Unix socket; every connection is a switch "
        "port carrying one Ethernet frame per message (pvbus serve net --switch PATH).",
    )
    parser.add_argument("--socket-path", required=True, help="Unix socket to create")
    parser.set_defaults(handler=_switch)


def _switch(args: argparse.Namespace) -> int:
    path = args.socket_path
    try:
        listener = listen_seqpacket(path)
    except OSError as err:
        raise CliError(f"cannot listen on {path}: {err.strerror or err}") from err
    loop = EventLoop()
    loop.stop_on_signals()
    server = SwitchServer(listener, loop)
    log.info("switch listening on %s", path)
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0
