"""``pvbus run -- COMMAND``: boot a throw-away guest on pvbus disks and run one command."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pvbus.cli._common import CliError
from pvbus.cli.guest import add_suite_option
from pvbus.vm.accel import ACCELS
from pvbus.vm.devices import DeviceSpec
from pvbus.vm.guest import GuestBuildError, default_guest
from pvbus.vm.qemu import COMMAND_CHANNELS, DISK_BACKENDS, TRANSPORTS, DiskSpec, VmConfig
from pvbus.vm.runner import CommandTimeoutError, GuestBootError, VmError, run_command


def add_vm_options(parser: argparse.ArgumentParser) -> None:
    """Options that shape the VM, shared with ``demo``."""
    parser.add_argument("--transport", choices=TRANSPORTS, default="pci", help="virtio transport")
    parser.add_argument(
        "--machine",
        choices=("q35", "pc", "microvm"),
        help="QEMU machine (default q35 for pci, microvm for mmio)",
    )
    parser.add_argument("--accel", choices=ACCELS, default="auto", help="accelerator")
    parser.add_argument("--memory", type=int, default=512, metavar="MiB", help="guest RAM")
    parser.add_argument("--cpus", type=int, default=1, metavar="N", help="guest CPUs")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds")
    parser.add_argument(
        "--disk-backend", choices=DISK_BACKENDS, default="pvbus", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="KIND[:KEY=VALUE,...]",
        help="extra pvbus device: net, rng, console or vsock; each KEY=VALUE is passed to "
        "'pvbus serve KIND' as --KEY VALUE (e.g. vsock:uds-path=/tmp/v.sock)",
    )
    parser.add_argument(
        "--channel",
        choices=COMMAND_CHANNELS,
        default="vsock",
        help="how output and status come back (vsock falls back to virtio-serial)",
    )
    add_suite_option(parser)


def vm_config(args: argparse.Namespace, disks: tuple[DiskSpec, ...]) -> VmConfig:
    """A validated :class:`VmConfig` from parsed options."""
    transport = args.transport
    if args.machine == "microvm":
        transport = "mmio"
    try:
        devices = tuple(DeviceSpec.parse(text) for text in getattr(args, "device", []))
        return VmConfig(
            devices=devices,
            command_channel=getattr(args, "channel", "vsock"),
            transport=transport,
            machine=args.machine,
            accel=args.accel,
            memory_mib=args.memory,
            cpus=args.cpus,
            disks=disks,
            disk_backend=args.disk_backend,
            kernel_suite=args.kernel_suite,
        )
    except ValueError as err:
        raise CliError(str(err)) from err


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a command in a throw-away guest",
        description="Boot a guest with pvbus vhost-user-blk disks and run COMMAND in it "
        "(one word: a shell script; more: a command line). Exits with its status.",
    )
    add_vm_options(run)
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="FILE[,ro]",
        help="disk image (repeatable; /dev/vda, /dev/vdb, ...)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    run.set_defaults(handler=_run)


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def run_in_guest(config: VmConfig, argv: list[str], timeout: float) -> int:
    """Run ``argv`` in a guest, printing its output live; map failures to :class:`CliError`."""
    try:
        guest = default_guest(suite=config.kernel_suite, progress=_progress)
        result = run_command(config, argv, timeout, on_output=_write, guest=guest)
    except GuestBuildError as err:
        raise CliError(f"guest build failed: {err}") from err
    except GuestBootError as err:
        if err.console_tail:
            print(err.console_tail, file=sys.stderr)
            raise CliError(f"{err} (console tail above)") from err
        raise CliError(str(err)) from err
    except CommandTimeoutError as err:
        raise CliError(str(err)) from err
    except VmError as err:
        raise CliError(str(err)) from err
    return result.status


def _progress(msg: str) -> None:
    print(f"pvbus: {msg}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CliError("no command given (pvbus run [OPTIONS] -- COMMAND...)")
    try:
        disks = tuple(DiskSpec.parse(d) for d in args.disk)
    except ValueError as err:
        raise CliError(str(err)) from err
    for disk in disks:
        if not disk.path.is_file():
            raise CliError(f"disk image {disk.path} does not exist")
    return run_in_guest(vm_config(args, disks), argv, args.timeout)
