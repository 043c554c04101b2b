"""``pvbus device add|list|show|rm``: device instances hosted by the bus daemon."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pvbus.cli._bus import add_api_socket, client, dump, table


def register(sub: Any) -> None:
    from pvbus.bus import device_types

    p = sub.add_parser("device", help="create, list, inspect and remove bus devices")
    cmds = p.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    add = cmds.add_parser("add", help="create a device (its worker starts in the daemon)")
    types = add.add_subparsers(dest="type", metavar="TYPE", required=True)
    for name, dtype in device_types().items():
        tp = types.add_parser(name, help=f"a {name} device; options as for pvbus serve {name}")
        add_api_socket(tp)
        tp.add_argument("--id", help="device name (default: TYPE plus a number)")
        tp.add_argument(
            "--coalesce-delay-us",
            type=int,
            help="interrupt coalescing: hold interrupts up to this many microseconds",
        )
        tp.add_argument(
            "--coalesce-batch",
            type=int,
            default=32,
            help="interrupt coalescing: ... or until this many requests completed (default 32)",
        )
        dtype.module.add_arguments(tp)
        tp.set_defaults(handler=_add, device_type=dtype)

    ls = cmds.add_parser("list", help="list devices")
    add_api_socket(ls)
    ls.set_defaults(handler=_list)

    show = cmds.add_parser("show", help="a device's configuration, state and stats as JSON")
    add_api_socket(show)
    show.add_argument("device")
    show.set_defaults(handler=_show)

    rm = cmds.add_parser("rm", help="remove a detached device (stops its worker)")
    add_api_socket(rm)
    rm.add_argument("device")
    rm.set_defaults(handler=_rm)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The device options as a config; arguments naming existing files become absolute."""
    config: dict[str, Any] = {}
    for name in args.device_type.options:
        value = getattr(args, name)
        if isinstance(value, str) and value and os.path.exists(value):
            value = os.path.abspath(value)
        config[name] = value
    return config


def _add(args: argparse.Namespace) -> int:
    coalesce = None
    if args.coalesce_delay_us:
        coalesce = {"max_delay_us": args.coalesce_delay_us, "max_batch": args.coalesce_batch}
    with client(args) as bus:
        info = bus.add_device(args.type, _config(args), args.id, coalesce)
    print(f"{info['id']}  {info['socket']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with client(args) as bus:
        devices = bus.devices()
    rows = [
        (
            d["id"],
            d["type"],
            d["state"],
            d["vm"] or "-",
            d["pid"] or "-",
            ",".join(d["status"]) or "-",
            d["socket"],
        )
        for d in devices
    ]
    print(table(rows, ("ID", "TYPE", "STATE", "VM", "PID", "STATUS", "SOCKET")))
    return 0


def _show(args: argparse.Namespace) -> int:
    with client(args) as bus:
        info = bus.device(args.device)
        info["stats"] = bus.stats(args.device)
    dump(info)
    return 0


def _rm(args: argparse.Namespace) -> int:
    with client(args) as bus:
        bus.remove_device(args.device)
    return 0
