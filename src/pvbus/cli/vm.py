"""``pvbus vm start|list|stop``: VMs on the bus (started by the daemon, or adopted by QMP)."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.cli._bus import add_api_socket, client, table


def register(sub: Any) -> None:
    p = sub.add_parser("vm", help="start, list and stop VMs on the bus")
    cmds = p.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)

    start = cmds.add_parser(
        "start", help="boot a long-running guest (no disks) or adopt a QEMU by its QMP socket"
    )
    add_api_socket(start)
    start.add_argument("--id", help="VM name (default: vm plus a number)")
    start.add_argument("--qmp-socket", help="adopt a QEMU started elsewhere through this socket")
    start.add_argument("--transport", choices=("pci", "mmio"), default="pci")
    start.add_argument("--machine", choices=("q35", "pc", "microvm"))
    start.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    start.add_argument("--memory", type=int, default=512, help="MiB (default 512)")
    start.add_argument("--cpus", type=int, default=1)
    start.add_argument(
        "--hotplug-slots", type=int, default=4, help="free PCIe root ports on q35 (default 4)"
    )
    start.set_defaults(handler=_start)

    ls = cmds.add_parser("list", help="list VMs")
    add_api_socket(ls)
    ls.set_defaults(handler=_list)

    stop = cmds.add_parser("stop", help="stop a VM the bus started; release an adopted one")
    add_api_socket(stop)
    stop.add_argument("vm")
    stop.set_defaults(handler=_stop)


def _start(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {
        "transport": args.transport,
        "accel": args.accel,
        "memory_mib": args.memory,
        "cpus": args.cpus,
        "hotplug_slots": args.hotplug_slots,
    }
    if args.id:
        spec["id"] = args.id
    if args.machine:
        spec["machine"] = args.machine
    if args.qmp_socket:
        spec = {"qmp_socket": args.qmp_socket, **({"id": args.id} if args.id else {})}
    with client(args) as bus:
        info = bus.start_vm(**spec)
    print(f"{info['id']}  {info['machine']}  {info['state']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with client(args) as bus:
        vms = bus.vms()
    rows = [
        (
            v["id"],
            v["machine"],
            v["state"],
            "bus" if v["owned"] else "adopted",
            ",".join(v["devices"]) or "-",
        )
        for v in vms
    ]
    print(table(rows, ("ID", "MACHINE", "STATE", "STARTED BY", "DEVICES")))
    return 0


def _stop(args: argparse.Namespace) -> int:
    with client(args) as bus:
        bus.stop_vm(args.vm)
    return 0
