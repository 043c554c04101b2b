"""Extra pvbus devices for a VM: net, rng, console and vsock, each served by ``pvbus serve``.

A :class:`DeviceSpec` names the device type and its ``pvbus serve`` options; the runner starts
one backend process per spec (:func:`start_device`) and QEMU gets a vhost-user device on its
socket (:func:`qemu_device_args`). QEMU has dedicated vhost-user devices for rng and vsock,
renders net as a virtio-net device on a ``vhost-user`` netdev,
the console uses the generic ``vhost-user-device`` (QEMU docs/system/devices/vhost-user.rst),
which needs the virtio id, the queue count and the config size on the command line.
On ``ccw`` (s390x) QEMU 10 renders only the net device: a vhost-user netdev behind
``virtio-net-ccw``. It has no ``vhost-user-rng-ccw``, ``vhost-user-vsock-ccw`` or
``vhost-user-device-ccw``; those names are asked for anyway, so a QEMU that gains them works
and one that lacks them is refused by :func:`unsupported_reason`.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pvbus.devices.console.device import CONFIG as CONSOLE_CONFIG
from pvbus.devices.console.device import ConsoleConfig, PortSpec
from pvbus.vm._process import BackendError, ServeProcess, spawn_serving

__all__ = [
    "DEVICE_KINDS",
    "DeviceBackend",
    "DeviceSpec",
    "creatable",
    "qemu_device_args",
    "qemu_device_name",
    "serve_argv",
    "start_device",
    "unsupported_reason",
]

DEVICE_KINDS = ("net", "rng", "console", "vsock")

#: QEMU device per kind and transport (pci, mmio, ccw).
_QEMU_DEVICES = {
    "net": ("virtio-net-pci", "virtio-net-device", "virtio-net-ccw"),
    "rng": ("vhost-user-rng-pci", "vhost-user-rng", "vhost-user-rng-ccw"),
    "vsock": ("vhost-user-vsock-pci", "vhost-user-vsock-device", "vhost-user-vsock-ccw"),
    "console": ("vhost-user-device-pci", "vhost-user-device", "vhost-user-device-ccw"),
}
_TRANSPORT_INDEX = {"pci": 0, "mmio": 1, "ccw": 2}


def qemu_device_name(kind: str, transport: str) -> str:
    """The QEMU device that renders a pvbus ``kind`` on ``transport``."""
    return _QEMU_DEVICES[kind][_TRANSPORT_INDEX[transport]]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One extra device: its kind and the options given to ``pvbus serve <kind>``."""

    kind: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device {self.kind!r} (use {', '.join(DEVICE_KINDS)})")

    @classmethod
    def rng(cls, rate_limit: int | None = None) -> DeviceSpec:
        return cls("rng", () if rate_limit is None else ("--rate-limit", str(rate_limit)))

    @classmethod
    def console(cls, *ports: str) -> DeviceSpec:
        """Ports as ``pvbus serve console --port`` takes them (the first is hvc0)."""
        args: list[str] = []
        for port in ports or ("null",):
            args += ["--port", port]
        return cls("console", tuple(args))

    @classmethod
    def vsock(cls, uds_path: Path, guest_cid: int = 3) -> DeviceSpec:
        return cls("vsock", ("--uds-path", str(uds_path), "--guest-cid", str(guest_cid)))

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """``KIND[:OPTION=VALUE,...]`` from the command line, e.g. ``console:port=socket:/c``.

        Each ``key=value`` becomes ``--key value`` for ``pvbus serve KIND``.
        """
        kind, _, rest = text.partition(":")
        args: list[str] = []
        for opt in filter(None, rest.split(",")):
            key, eq, value = opt.partition("=")
            if not eq or not key:
                raise ValueError(f"device {text!r}: option {opt!r} is not key=value")
            args += [f"--{key}", value]
        return cls(kind, tuple(args))

    def option(self, name: str) -> str | None:
        """The value given for ``--name``, if any."""
        flag = f"--{name}"
        for key, value in zip(self.args, self.args[1:], strict=False):
            if key == flag:
                return value
        return None

    def console_queues(self) -> int:
        """The console's queue count, as the backend will compute it from the same ports."""
        ports = [v for k, v in zip(self.args, self.args[1:], strict=False) if k == "--port"]
        specs = tuple(PortSpec.parse(p) for p in ports or ["stdio"])
        max_ports = None
        if "--max-ports" in self.args:
            max_ports = int(self.args[self.args.index("--max-ports") + 1])
        multiport = True if "--multiport" in self.args else None
        return ConsoleConfig(ports=specs, multiport=multiport, max_ports=max_ports).num_queues


@functools.cache
def _creatable_devices(qemu: str) -> frozenset[str]:
    """Device names ``qemu -device help`` lists (only user-creatable ones are listed)."""
    try:
        out = subprocess.run(
            [qemu, "-device", "help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r'^name "([^"]+)"', out.stdout + out.stderr, re.MULTILINE))


def creatable(device: str, qemu: str) -> bool:
    """Whether ``qemu -device help`` lists ``device`` (so ``-device`` can create it)."""
    return device in _creatable_devices(qemu)


def unsupported_reason(spec: DeviceSpec, transport: str, qemu: str) -> str | None:
    """Why ``qemu`` cannot render ``spec`` (None if it can).

    QEMU builds the generic ``vhost-user-device`` with ``user_creatable = false`` ("stop
    inexperienced users confusing themselves"), Debian's QEMU 10 among them: such a QEMU has
    no way to give a guest a vhost-user console. On ccw only net has a device (QEMU 10).
    """
    device = qemu_device_name(spec.kind, transport)
    if device not in _creatable_devices(qemu):
        why = f"{qemu} cannot create {device} (needed for a vhost-user {spec.kind}"
        if transport == "ccw":
            why += "; QEMU has no CCW proxy for it"
        return why + ")"
    return None


def serve_argv(spec: DeviceSpec, socket_path: Path) -> list[str]:
    """``pvbus serve`` for ``spec`` in this interpreter."""
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", spec.kind]
    return [*argv, "--socket-path", str(socket_path), *spec.args]


def qemu_device_args(
    spec: DeviceSpec, transport: str, index: int, socket_path: Path, *, packed: bool = False
) -> list[str]:
    """``-chardev`` and ``-device`` for ``spec`` on ``socket_path`` (``packed``: packed=on)."""
    device = qemu_device_name(spec.kind, transport)
    chardev = f"pvdev{index}"
    ring = ",packed=on" if packed else ""
    if spec.kind == "net":
        pairs = int(spec.option("queue-pairs") or 1)
        netdev = f"vhost-user,id=pvnet{index},chardev={chardev},queues={pairs}"
        props = f"{device},id=pvdev{index}dev,netdev=pvnet{index}"
        mac = spec.option("mac")
        if mac:
            props += f",mac={mac}"
        if pairs > 1:
            props += ",mq=on" + (f",vectors={2 * pairs + 2}" if transport == "pci" else "")
        props += ring
        return [
            "-chardev",
            f"socket,id={chardev},path={socket_path}",
            "-netdev",
            netdev,
            "-device",
            props,
        ]
    props = f"{device},id=pvdev{index}dev,chardev={chardev}"
    if spec.kind == "console":
        props += f",virtio-id=3,num_vqs={spec.console_queues()},config_size={CONSOLE_CONFIG.size}"
    props += ring
    return ["-chardev", f"socket,id={chardev},path={socket_path}", "-device", props]


@dataclass
class DeviceBackend(ServeProcess):
    """A running ``pvbus serve`` process for one device."""

    spec: DeviceSpec = field(kw_only=True)


def start_device(
    spec: DeviceSpec, socket_path: Path, log_path: Path, *, timeout: float = 15.0
) -> DeviceBackend:
    """Start the backend for ``spec`` and wait until it listens; raises RuntimeError."""
    try:
        proc = spawn_serving(
            serve_argv(spec, socket_path),
            socket_path,
            log_path,
            f"pvbus serve {spec.kind}",
            timeout,
        )
    except BackendError as err:
        raise RuntimeError(str(err)) from err
    return DeviceBackend(socket_path, proc, log_path, spec=spec)
