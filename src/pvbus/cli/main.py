"""Entry point of the ``pvbus`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from pvbus import __version__
from pvbus.cli._common import CliError

#: Sub-command modules, each with ``register(subparsers)``.
_COMMANDS = (
    "serve",
    "guest",
    "run",
    "demo",
    "switch",
    "bench",
    "daemon",
    "device",
    "vm",
    "attach",
    "fuzz",
    "soak",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvbus", description="Paravirtual I/O: virtio devices over vhost-user."
    )
    parser.add_argument("--version", action="version", version=f"pvbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        module = importlib.import_module(f"pvbus.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as err:
        print(f"pvbus: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
