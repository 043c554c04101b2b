"""Guest images and a QEMU runner: boot a throw-away Linux guest on pvbus devices.

``build_guest``/``default_guest`` make a Debian kernel + busybox initramfs; ``Vm`` and
``run_command`` boot it under QEMU with vhost-user-blk disks served by pvbus (or
qemu-storage-daemon) and run one command, returning its output and exit status.
"""

from pvbus.vm.accel import AccelChoice, choose_accel
from pvbus.vm.backends import BACKENDS, Backend, BackendError, start_backend
from pvbus.vm.guest import GuestBuildError, GuestImage, build_guest, cache_root, default_guest
from pvbus.vm.qemu import DiskSpec, VmConfig, VmPaths, qemu_argv
from pvbus.vm.runner import (
    CommandTimeoutError,
    GuestBootError,
    RunResult,
    Vm,
    VmError,
    VmState,
    run_command,
)

__all__ = [
    "BACKENDS",
    "AccelChoice",
    "Backend",
    "BackendError",
    "CommandTimeoutError",
    "DiskSpec",
    "GuestBootError",
    "GuestBuildError",
    "GuestImage",
    "RunResult",
    "Vm",
    "VmConfig",
    "VmError",
    "VmPaths",
    "VmState",
    "build_guest",
    "cache_root",
    "choose_accel",
    "default_guest",
    "qemu_argv",
    "run_command",
    "start_backend",
]
