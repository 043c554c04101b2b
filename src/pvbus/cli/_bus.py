"""Helpers shared by the CLI commands that talk to the bus daemon."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pvbus.cli._common import CliError


def add_api_socket(parser: argparse.ArgumentParser) -> None:
    """The ``--api-socket`` option every bus command takes."""
    parser.add_argument(
        "--api-socket",
        type=Path,
        help="the daemon's API socket (default: $PVBUS_API_SOCKET, "
        "/run/pvbus/api.sock for root, else $XDG_RUNTIME_DIR/pvbus/api.sock)",
    )


@contextlib.contextmanager
def client(args: argparse.Namespace) -> Iterator[Any]:
    """A :class:`~pvbus.bus.client.BusClient`; its errors become one-line CLI errors."""
    from pvbus.bus.client import BusClient, ClientError

    bus = BusClient(args.api_socket)
    try:
        yield bus
    except ClientError as err:
        raise CliError(str(err)) from err
    finally:
        bus.close()


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def dump(obj: object) -> None:
    """Pretty JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True))
