"""VM configuration and the QEMU command line built from it (pure: no processes started here).

Guest RAM is a shared memfd so vhost-user backends can map it. With ``packed`` every device
pvbus serves gets QEMU's ``packed=on``: the guest may then choose packed virtqueues (VIRTIO 1.2
section 2.8). Three transports:

* ``pci``: ``q35`` (default) or ``pc``; devices ``*-pci``.
* ``mmio``: ``microvm`` with qboot, no legacy PIT/PIC/RTC; devices ``*-device`` on
  virtio-mmio, found by the guest through ACPI. The kernel needs ``tsc_early_khz`` since no
  timer is left to calibrate the TSC against.
* ``ccw``: ``s390-ccw-virtio`` under ``qemu-system-s390x`` (TCG on an x86 host), an s390x
  guest (big-endian; virtio 1.x rings are little-endian whatever the CPU); devices
  ``*-ccw`` on the channel subsystem, console on SCLP (``ttysclp0``). QEMU 10 renders only
  some vhost-user devices on CCW: a vhost-user netdev behind ``virtio-net-ccw`` yes, but
  there is no ``vhost-user-blk-ccw`` (nor rng, vsock or generic device): the runner refuses
  what ``qemu -device help`` does not list (:func:`pvbus.vm.devices.unsupported_reason`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pvbus.vm.devices import DeviceSpec, qemu_device_args
from pvbus.vm.guest import DEFAULT_ARCH, DEFAULT_SUITE, OUTPUT_PORT, SUITES

__all__ = [
    "COMMAND_CHANNELS",
    "DISK_BACKENDS",
    "GUEST_ARCH",
    "MACHINES",
    "QBOOT",
    "QEMU",
    "QEMU_S390X",
    "TRANSPORTS",
    "DiskSpec",
    "VmConfig",
    "VmPaths",
    "blk_device",
    "default_qemu",
    "format_argv",
    "host_tsc_khz",
    "kernel_cmdline",
    "qemu_argv",
    "reconnect_option",
    "reconnect_setting",
]

TRANSPORTS = ("pci", "mmio", "ccw")
MACHINES = {"pci": ("q35", "pc"), "mmio": ("microvm",), "ccw": ("s390-ccw-virtio",)}
#: The guest's Debian architecture per transport (see :func:`pvbus.vm.guest.build_guest`).
GUEST_ARCH = {"pci": DEFAULT_ARCH, "mmio": DEFAULT_ARCH, "ccw": "s390x"}
DISK_BACKENDS = ("pvbus", "qsd")
#: How the command's output and status come back: a vsock stream (falling back to the
#: virtio-serial port if the guest cannot connect) or the virtio-serial port only.
COMMAND_CHANNELS = ("vsock", "serial")
QBOOT = Path("/usr/share/qemu/qboot.rom")
#: The QEMU binary looked up in PATH unless ``$PVBUS_QEMU`` names another.
QEMU = "qemu-system-x86_64"
#: The QEMU of the ``ccw`` transport, unless ``$PVBUS_QEMU_S390X`` names another.
QEMU_S390X = "qemu-system-s390x"

_MICROVM = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off"


def default_qemu(transport: str) -> str:
    """``$PVBUS_QEMU`` or qemu-system-x86_64; for ccw ``$PVBUS_QEMU_S390X`` or qemu-system-s390x."""
    if transport == "ccw":
        return os.environ.get("PVBUS_QEMU_S390X", QEMU_S390X)
    return os.environ.get("PVBUS_QEMU", QEMU)


def blk_device(transport: str) -> str:
    """QEMU's vhost-user-blk device on ``transport``."""
    return {"pci": "vhost-user-blk-pci", "mmio": "vhost-user-blk", "ccw": "vhost-user-blk-ccw"}[
        transport
    ]


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk: an image file served by a vhost-user-blk backend."""

    path: Path
    read_only: bool = False
    num_queues: int = 1
    #: An already-running backend to connect to instead of starting one.
    socket: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """``FILE[,ro][,queues=N]`` as given to ``--disk``."""
        path, *opts = text.split(",")
        if not path:
            raise ValueError(f"disk {text!r}: no file name")
        read_only = False
        queues = 1
        for opt in opts:
            if opt in ("ro", "readonly"):
                read_only = True
            elif opt == "rw":
                read_only = False
            elif opt.startswith("queues=") and opt[7:].isdigit() and int(opt[7:]) > 0:
                queues = int(opt[7:])
            else:
                raise ValueError(f"disk {text!r}: unknown option {opt!r} (use ro, queues=N)")
        return cls(Path(path), read_only, queues)


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Everything that shapes one VM; validated when built."""

    transport: str = "pci"
    machine: str | None = None
    accel: str = "auto"
    memory_mib: int = 512
    cpus: int = 1
    disks: tuple[DiskSpec, ...] = ()
    disk_backend: str = "pvbus"
    #: Extra pvbus devices (rng, console, vsock), each served by its own ``pvbus serve``.
    devices: tuple[DeviceSpec, ...] = ()
    command_channel: str = "vsock"
    kernel_suite: str = DEFAULT_SUITE
    kernel_args: tuple[str, ...] = ()
    #: Reconnect to a backend that went away, after this many ms (0: never). With pvbus's
    #: inflight tracking the guest then goes on without an I/O error.
    reconnect_ms: int = 200
    #: The QEMU binary; empty: :func:`default_qemu` for the transport (``$PVBUS_QEMU``, a QEMU
    #: of your own build, or qemu-system-x86_64 from PATH; for ccw qemu-system-s390x).
    qemu: str = ""
    #: Offer packed virtqueues (``packed=on``) on the devices pvbus serves; a Linux guest
    #: then uses them. (QEMU's generic vhost-user devices, rng and console, pass on whatever
    #: the backend offers, so those are packed either way.)
    packed: bool = False
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}")
        if not self.qemu:
            object.__setattr__(self, "qemu", default_qemu(self.transport))
        if self.machine is not None and self.machine not in MACHINES[self.transport]:
            allowed = ", ".join(MACHINES[self.transport])
            raise ValueError(
                f"machine {self.machine!r} does not fit transport {self.transport} ({allowed})"
            )
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"unknown accelerator {self.accel!r}")
        if self.memory_mib < 64:
            raise ValueError("memory must be at least 64 MiB")
        if not 1 <= self.cpus <= 64:
            raise ValueError("cpus must be between 1 and 64")
        if self.disk_backend not in DISK_BACKENDS:
            raise ValueError(f"unknown disk backend {self.disk_backend!r}")
        if self.packed and self.disk_backend != "pvbus" and self.disks:
            raise ValueError("packed rings need pvbus disks (qemu-storage-daemon has split only)")
        if self.command_channel not in COMMAND_CHANNELS:
            raise ValueError(f"unknown command channel {self.command_channel!r}")
        if self.kernel_suite not in SUITES:
            raise ValueError(f"unknown kernel suite {self.kernel_suite!r}")

    @property
    def machine_type(self) -> str:
        """The machine actually used (default: q35 for pci, microvm for mmio)."""
        return self.machine or MACHINES[self.transport][0]

    @property
    def arch(self) -> str:
        """The guest's Debian architecture (amd64, or s390x for ccw)."""
        return GUEST_ARCH[self.transport]


@dataclass(frozen=True, slots=True)
class VmPaths:
    """Files of one VM run: guest images in, sockets and logs out."""

    kernel: Path
    initrd: Path
    console_log: Path
    output_socket: Path
    qmp_socket: Path
    disk_sockets: tuple[Path, ...] = ()
    #: One vhost-user socket per entry of :attr:`VmConfig.devices` (then any the runner adds).
    device_sockets: tuple[Path, ...] = ()
    #: Devices the runner adds itself (the command channel's vsock, the console).
    runner_devices: tuple[DeviceSpec, ...] = ()
    #: A server socket for QEMU's own ``virtconsole`` (the guest's hvc0), for an interactive
    #: shell when this QEMU cannot render pvbus's console device.
    console_socket: Path | None = None


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host TSC rate in kHz, from the first ``cpu MHz`` line (0 if unknown)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def kernel_cmdline(config: VmConfig, tsc_khz: int = 0) -> str:
    """Kernel command line: console on ttyS0 (SCLP on s390x), no reboot on panic, quiet-ish."""
    console = "ttysclp0" if config.transport == "ccw" else "ttyS0"
    args = [f"console={console}", "panic=-1", "loglevel=4", "rdinit=/init"]
    if config.transport == "mmio":
        if tsc_khz > 0:
            args.append(f"tsc_early_khz={tsc_khz}")
        args.append("reboot=t")
    args.extend(config.kernel_args)
    return " ".join(args)


def _serial_device(transport: str) -> str:
    return {"pci": "virtio-serial-pci", "mmio": "virtio-serial-device", "ccw": "virtio-serial-ccw"}[
        transport
    ]


def reconnect_setting(reconnect_ms: int, qemu_version: tuple[int, int]) -> dict[str, int]:
    """The socket chardev's reconnect setting: ``reconnect-ms`` from QEMU 9.2, else seconds
    (none for ``reconnect_ms <= 0``); as QMP's ``chardev-add`` takes it."""
    if reconnect_ms <= 0:
        return {}
    if qemu_version >= (9, 2):
        return {"reconnect-ms": reconnect_ms}
    return {"reconnect": max(1, round(reconnect_ms / 1000))}


def reconnect_option(reconnect_ms: int, qemu_version: tuple[int, int]) -> str:
    """:func:`reconnect_setting` as ``-chardev`` options (``,reconnect-ms=200``)."""
    return "".join(f",{k}={v}" for k, v in reconnect_setting(reconnect_ms, qemu_version).items())


def qemu_argv(
    config: VmConfig,
    paths: VmPaths,
    accel: str,
    tsc_khz: int = 0,
    qemu_version: tuple[int, int] = (10, 0),
) -> list[str]:
    """The full QEMU command line; ``accel`` is the resolved ``kvm`` or ``tcg``."""
    if len(paths.disk_sockets) != len(config.disks):
        raise ValueError("one socket per disk is needed")
    mem = f"{config.memory_mib}M"
    machine = config.machine_type
    machine_opts = _MICROVM if machine == "microvm" else machine
    argv = [config.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    # ccw: QEMU maps -serial to the SCLP console; s390x TCG's "max" CPU boots Debian's kernel.
    argv += ["-accel", accel, "-cpu", "host" if accel == "kvm" else "max"]
    argv += ["-m", mem, "-smp", str(config.cpus)]
    argv += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
    argv += ["-machine", f"{machine_opts},memory-backend=mem"]
    if machine == "microvm":
        argv += ["-bios", str(QBOOT), "-global", "virtio-mmio.force-legacy=false"]
    argv += ["-kernel", str(paths.kernel), "-initrd", str(paths.initrd)]
    argv += ["-append", kernel_cmdline(config, tsc_khz)]
    argv += ["-chardev", f"file,id=console,path={paths.console_log}", "-serial", "chardev:console"]
    argv += ["-device", _serial_device(config.transport) + ",id=vser"]
    argv += ["-chardev", f"socket,id=pvbusout,path={paths.output_socket}"]
    argv += ["-device", f"virtserialport,bus=vser.0,chardev=pvbusout,name={OUTPUT_PORT}"]
    if paths.console_socket is not None:
        term = f"socket,id=pvbusterm,path={paths.console_socket},server=on,wait=off"
        argv += ["-chardev", term, "-device", "virtconsole,bus=vser.0,chardev=pvbusterm"]
    blk = blk_device(config.transport)
    for i, (disk, sock) in enumerate(zip(config.disks, paths.disk_sockets, strict=True)):
        reconnect = reconnect_option(config.reconnect_ms, qemu_version)
        argv += ["-chardev", f"socket,id=disk{i},path={sock}{reconnect}"]
        # virtio-mmio lets the guest pick rings up to 1024 entries whatever queue-size says,
        # while QEMU sizes the inflight area by queue-size: make them agree.
        size = ",queue-size=1024" if config.transport == "mmio" else ""
        packed = ",packed=on" if config.packed else ""
        argv += [
            "-device",
            f"{blk},id=vdisk{i},chardev=disk{i},num-queues={disk.num_queues}{size}{packed}",
        ]
    devices = config.devices + paths.runner_devices
    for i, (spec, sock) in enumerate(zip(devices, paths.device_sockets, strict=True)):
        argv += qemu_device_args(spec, config.transport, i, sock, packed=config.packed)
    argv += ["-qmp", f"unix:{paths.qmp_socket},server=on,wait=off"]
    argv += list(config.extra_args)
    return argv


def format_argv(argv: list[str]) -> str:
    """A shell-quoted command line, for logs."""
    return shlex.join(argv)
