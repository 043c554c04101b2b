"""``pvbus run [-- COMMAND]``: boot a throw-away guest on pvbus disks and run one command, or
give an interactive shell on its hvc0 when there is none."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from pvbus.cli._common import CliError
from pvbus.cli.guest import add_suite_option
from pvbus.vm.accel import ACCELS
from pvbus.vm.devices import DeviceSpec
from pvbus.vm.guest import GuestBuildError, default_guest
from pvbus.vm.qemu import COMMAND_CHANNELS, DISK_BACKENDS, TRANSPORTS, DiskSpec, VmConfig
from pvbus.vm.runner import CommandTimeoutError, GuestBootError, Vm, VmError, run_command
from pvbus.vm.terminal import ESCAPE_NAME


def add_vm_options(parser: argparse.ArgumentParser) -> None:
    """Options that shape the VM, shared with ``demo``."""
    parser.add_argument("--transport", choices=TRANSPORTS, default="pci", help="virtio transport")
    parser.add_argument(
        "--machine",
        choices=("q35", "pc", "microvm", "s390-ccw-virtio"),
        help="QEMU machine (default q35 for pci, microvm for mmio, s390-ccw-virtio for ccw: "
        "an s390x guest under qemu-system-s390x)",
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
        "--packed",
        action="store_true",
        help="offer packed virtqueues (VIRTIO 1.2 section 2.8) on the pvbus devices",
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
    elif args.machine == "s390-ccw-virtio":
        transport = "ccw"
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
            packed=args.packed,
        )
    except ValueError as err:
        raise CliError(str(err)) from err


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a command (or a shell) in a throw-away guest",
        description="Boot a guest with pvbus vhost-user-blk disks and run COMMAND in it "
        "(one word: a shell script; more: a command line). Exits with its status. With no "
        f"COMMAND: an interactive shell on the guest's hvc0 ({ESCAPE_NAME} quits; --timeout "
        "bounds the boot only), or the script on stdin if that is not a terminal.",
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
    with _vm_errors():
        guest = default_guest(suite=config.kernel_suite, progress=_progress, arch=config.arch)
        result = run_command(config, argv, timeout, on_output=_write, guest=guest)
    return result.status


def shell_in_guest(config: VmConfig, boot_timeout: float) -> int:
    """An interactive shell on the guest's hvc0 in this terminal, until it exits or the
    escape key; map failures to :class:`CliError`."""
    with _vm_errors():
        guest = default_guest(suite=config.kernel_suite, progress=_progress, arch=config.arch)
        vm = Vm(config, None, guest=guest)
        try:
            vm.start()
            who = (
                "pvbus's console device" if vm.console_renderer == "pvbus" else "QEMU's virtconsole"
            )
            _progress(f"shell on hvc0 ({who}); {ESCAPE_NAME} quits")
            why = vm.interact(boot_timeout=boot_timeout)
        finally:
            vm.stop()
    _progress("escape: guest stopped" if why == "escape" else "guest powered off")
    return 0


@contextlib.contextmanager
def _vm_errors() -> Iterator[None]:
    """Failures as one-line :class:`CliError` s; SIGTERM and SIGHUP (the terminal went away)
    unwind like Ctrl-C, so the VM and its backends are stopped on the way out."""

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, unwind) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress(msg: str) -> None:
    print(f"pvbus: {msg}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        disks = tuple(DiskSpec.parse(d) for d in args.disk)
    except ValueError as err:
        raise CliError(str(err)) from err
    for disk in disks:
        if not disk.path.is_file():
            raise CliError(f"disk image {disk.path} does not exist")
    if not argv:
        if os.isatty(0):
            return shell_in_guest(vm_config(args, disks), args.timeout)
        script = sys.stdin.read()
        if not script.strip():
            raise CliError("no command given and none on stdin (pvbus run [OPTIONS] -- COMMAND...)")
        argv = [script]
    return run_in_guest(vm_config(args, disks), argv, args.timeout)
