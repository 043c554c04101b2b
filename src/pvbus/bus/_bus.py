"""The PV bus: device instances in worker processes, VMs and their buses, hot-plug over QMP.

:class:`Bus` is the controller behind the API. It lives in one asyncio loop and decides which
commands are legal in which state (attaching twice, detaching what is not attached, a device
the VM's platform cannot take), raising :class:`BusError` with a one-line reason.

Hot-plug (QEMU's QMP): ``chardev-add`` a socket chardev connected to the device's worker, then
``device_add`` the type's vhost-user driver on a free ``pcie-root-port`` (q35) or on ``pci.0``
(pc); detach is ``device_del``, waiting for ``DEVICE_DELETED`` (the guest released the
device), then ``chardev-remove``, then the worker stops. QEMU's ``microvm`` (virtio-mmio) has
no hot-plug.

A device always has at most one worker. One starts with the device, and a fresh one after every
detach (or when the VM goes away), so an unattached device keeps serving its socket to userspace
frontends and each attachment begins on a worker no VM has used; an attach starts one if the
last died. The counters a stopped worker leaves behind are kept (:attr:`DeviceRecord.base`), so
a device's stats are cumulative over its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from pvbus.bus._events import EventLog
from pvbus.bus._registry import DeviceType, UnknownDeviceTypeError, device_type
from pvbus.bus._stats import DeviceSnapshot, StatsBlock
from pvbus.bus._worker import worker_argv
from pvbus.virtio.constants import DeviceStatus
from pvbus.vm import Vm, VmConfig, VmError
from pvbus.vm.qemu import reconnect_setting
from pvbus.vm.runner import INIT_READY

log = logging.getLogger("pvbus.bus")

__all__ = [
    "GUEST_SCRIPT",
    "SHELL_PORT",
    "Bus",
    "BusError",
    "Coalesce",
    "DeviceRecord",
    "VmRecord",
    "VmSpec",
]

#: virtio-serial port name of the shell a bus-started guest runs for the host.
SHELL_PORT = "org.pvbus.shell"

#: What a bus-started guest runs: a shell on the ``org.pvbus.shell`` port, forever.
GUEST_SCRIPT = f"""dev=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = {SHELL_PORT} ] && dev=/dev/${{p##*/}}
done
echo "pvbus-guest: idle, shell on ${{dev:-none}}" >/dev/console
while :; do
  [ -n "$dev" ] && sh <>"$dev" >&0 2>&0
  sleep 0.2
done
"""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_MONITOR_INTERVAL = 0.05
#: How soon QEMU tries a hot-plugged device's socket again after its worker went away.
_RECONNECT_MS = 200
#: A worker that dies within this many seconds of being restarted is not restarted again.
_REVIVE_PAUSE = 5.0
_WORKER_START_TIMEOUT = 15.0
_UNPLUG_TIMEOUT = 30.0


class BusError(Exception):
    """A request the bus refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class Coalesce(pydantic.BaseModel):
    """Interrupt coalescing: hold interrupts up to ``max_delay_us``, or ``max_batch`` requests."""

    model_config = pydantic.ConfigDict(extra="forbid")
    max_delay_us: int = pydantic.Field(gt=0, le=1_000_000)
    max_batch: int = pydantic.Field(default=32, gt=0, le=65536)


class VmSpec(pydantic.BaseModel):
    """A VM to start (a long-running guest with a shell port), or one to adopt by QMP socket."""

    model_config = pydantic.ConfigDict(extra="forbid")
    id: str | None = pydantic.Field(default=None, pattern=_NAME)
    qmp_socket: str | None = pydantic.Field(
        default=None, description="adopt a QEMU started elsewhere through this QMP socket"
    )
    transport: str = pydantic.Field(default="pci", pattern="^(pci|mmio)$")
    machine: str | None = pydantic.Field(default=None, pattern="^(q35|pc|microvm)$")
    accel: str = pydantic.Field(default="auto", pattern="^(auto|kvm|tcg)$")
    memory_mib: int = pydantic.Field(default=512, ge=64, le=65536)
    cpus: int = pydantic.Field(default=1, ge=1, le=64)
    hotplug_slots: int = pydantic.Field(
        default=4, ge=0, le=32, description="free pcie-root-ports on q35"
    )
    boot_timeout: float = pydantic.Field(default=120.0, gt=0, le=3600)


@dataclass
class Worker:
    """One worker process of a device and the daemon's read-only mapping of its stats block."""

    process: asyncio.subprocess.Process
    stats_fd: int
    stats: StatsBlock

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid


@dataclass
class DeviceRecord:
    """A device instance: its current worker, socket, counters and where it is plugged in.

    ``state``: ``starting`` / ``stopping`` while a worker starts or stops, ``attaching``
    during a hot-plug, ``ready`` while a worker serves the socket, ``failed`` once it died
    (an attach or detach starts a new one), ``stopped`` once the device is deleted. ``base``
    holds the counters earlier workers left behind, so :meth:`snapshot` is cumulative over
    the device's life.
    """

    id: str
    type: DeviceType
    config: pydantic.BaseModel
    coalesce: Coalesce | None
    socket: Path
    log_path: Path
    worker: Worker | None = None
    workers: int = 0
    base: DeviceSnapshot | None = None
    state: str = "starting"
    vm: str | None = None
    qdev: str | None = None
    bus: str | None = None
    last: DeviceSnapshot | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: When the bus last restarted a crashed worker of the attached device (monotonic).
    restarted: float = -1e9

    def snapshot(self) -> DeviceSnapshot:
        """Counters of every worker so far, status of the current one."""
        if self.worker is None:
            return self.base or _NO_STATS
        return self.worker.stats.snapshot().plus(self.base)

    def info(self) -> dict[str, Any]:
        """JSON-ready description."""
        snap = self.snapshot()
        return {
            "id": self.id,
            "type": self.type.name,
            "config": self.config.model_dump(),
            "coalesce": self.coalesce.model_dump() if self.coalesce else None,
            "socket": str(self.socket),
            "state": self.state,
            "pid": self.worker.pid if self.worker else None,
            "workers": self.workers,
            "vm": self.vm,
            "qdev": self.qdev,
            "bus": self.bus,
            "status": _status_names(snap.status, snap.needs_reset),
            "connected": snap.connected,
        }


_NO_STATS = DeviceSnapshot(False, 0, False, False, 0, 0)


@dataclass
class VmRecord:
    """A VM the bus started (``vm`` set) or adopted through its QMP socket."""

    id: str
    qmp: QMPClient
    qmp_socket: Path
    machine: str
    vm: Vm | None = None
    workdir: Path | None = None
    state: str = "running"
    devices: set[str] = field(default_factory=set)
    deleted: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def owned(self) -> bool:
        """Started (and so stopped) by the bus."""
        return self.vm is not None

    @property
    def shell_socket(self) -> Path | None:
        """Unix socket of the guest shell (bus-started VMs only)."""
        return self.workdir / "shell.sock" if self.workdir else None

    def info(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "id": self.id,
            "owned": self.owned,
            "machine": self.machine,
            "state": self.state,
            "qmp_socket": str(self.qmp_socket),
            "shell_socket": str(self.shell_socket) if self.shell_socket else None,
            "console_log": str(self.vm.console_log) if self.vm else None,
            "pid": self.vm.pid if self.vm else None,
            "devices": sorted(self.devices),
        }


def _status_names(status: int, needs_reset: bool) -> list[str]:
    names = [f.name for f in DeviceStatus if f.name and status & f]
    if needs_reset and "DEVICE_NEEDS_RESET" not in names:
        names.append("DEVICE_NEEDS_RESET")
    return names


def _machine_kind(qom_type: str) -> str:
    if "microvm" in qom_type:
        return "microvm"
    if "q35" in qom_type:
        return "q35"
    if qom_type.startswith("pc"):
        return "pc"
    return qom_type.removesuffix("-machine")


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Bus:
    """Devices, VMs and the event log of one daemon, under ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.devices: dict[str, DeviceRecord] = {}
        self.vms: dict[str, VmRecord] = {}
        self.events = EventLog()
        self._monitor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._counter = 0
        self._closing = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the run directories and start watching workers."""
        for sub in ("devices", "vms"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._monitor = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Detach everything, stop our VMs and every worker, remove sockets."""
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for vm in list(self.vms.values()):
            try:
                await self.stop_vm(vm.id)
            except Exception as err:
                log.warning("stopping VM %s: %s", vm.id, err)
        for dev in list(self.devices.values()):
            await self._retire(dev, report=False)
            dev.log_path.unlink(missing_ok=True)
            self.devices.pop(dev.id, None)
        self.events.close()

    def _new_id(self, prefix: str, taken: dict[str, Any]) -> str:
        while True:
            name = f"{prefix}{self._counter}"
            self._counter += 1
            if name not in taken:
                return name

    # -- devices ----------------------------------------------------------------------------

    def device(self, dev_id: str) -> DeviceRecord:
        """The device ``dev_id`` or a 404."""
        try:
            return self.devices[dev_id]
        except KeyError:
            raise BusError(f"unknown device {dev_id!r}", 404) from None

    async def create_device(
        self,
        type_name: str,
        config: dict[str, Any] | pydantic.BaseModel,
        *,
        dev_id: str | None = None,
        coalesce: Coalesce | None = None,
    ) -> DeviceRecord:
        """Validate ``config``, start a worker for it and wait until it listens."""
        try:
            dtype = device_type(type_name)
        except UnknownDeviceTypeError:
            raise BusError(f"unknown device type {type_name!r}", 422) from None
        if isinstance(config, dict):
            try:
                config = dtype.config_model.model_validate(config)
            except pydantic.ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise BusError(f"{type_name} config: {where}: {first['msg']}", 422) from None
        if dev_id is not None and not re.match(_NAME, dev_id):
            raise BusError(f"bad device id {dev_id!r}", 422)
        async with self._lock:
            if dev_id is None:
                dev_id = self._new_id(type_name, self.devices)
            elif dev_id in self.devices:
                raise BusError(f"device {dev_id!r} exists", 409)
            devices = self.run_dir / "devices"
            rec = DeviceRecord(
                dev_id,
                dtype,
                config,
                coalesce,
                devices / f"{dev_id}.sock",
                devices / f"{dev_id}.log",
            )
            try:
                await self._spawn(rec)
            except BusError:
                rec.log_path.unlink(missing_ok=True)
                raise
            self.devices[dev_id] = rec
        self.events.emit("DEVICE_CREATED", device=dev_id, type=dtype.name, socket=str(rec.socket))
        return rec

    async def _spawn(self, rec: DeviceRecord) -> None:
        """Start a worker for ``rec`` and wait until it listens (BusError if it does not)."""
        assert rec.worker is None
        rec.state = "starting"
        fd, block = StatsBlock.create()
        coalesce = rec.coalesce
        argv = worker_argv(
            rec.type.name,
            str(rec.socket),
            fd,
            rec.type.argv(rec.config),
            max_delay_us=coalesce.max_delay_us if coalesce else 0,
            max_batch=coalesce.max_batch if coalesce else 0,
        )
        try:
            with rec.log_path.open("ab") as logf:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    pass_fds=(fd,),
                )
        except OSError as err:
            block.close()
            os.close(fd)
            rec.state = "failed"
            raise BusError(f"cannot start a worker for {rec.id}: {err}", 500) from None
        rec.worker = Worker(proc, fd, block)
        rec.workers += 1
        try:
            await self._wait_ready(rec, rec.worker)
        except BusError:
            await self._retire(rec, report=False)
            rec.state = "failed"
            raise
        rec.state = "ready"
        rec.last = rec.snapshot()
        log.info("device %s (%s) ready, worker pid %d", rec.id, rec.type.name, proc.pid)

    async def _wait_ready(self, rec: DeviceRecord, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _WORKER_START_TIMEOUT
        while not worker.stats.ready:
            if worker.process.returncode is not None:
                why = _tail(rec.log_path) or f"worker exited with {worker.process.returncode}"
                raise BusError(why.removeprefix("pvbus-worker: "), 422)
            if loop.time() > deadline:
                raise BusError(f"worker for {rec.id} did not start", 500)
            await asyncio.sleep(0.01)

    async def _retire(self, rec: DeviceRecord, *, report: bool) -> None:
        """Stop ``rec``'s worker (if any), keep its final counters in ``rec.base``.

        With ``report``, the changes in its final publication (the frontend's disconnect, the
        reset to status 0) become events before this returns, so whatever the caller emits
        next (``DEVDROP``) comes after them.
        """
        worker = rec.worker
        if worker is None:
            return
        rec.state = "stopping"
        proc = worker.process
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._fold(rec, report=report)

    def _fold(self, rec: DeviceRecord, *, report: bool) -> None:
        """The worker exited: add its last counters to the base and unmap its stats block.

        With ``report``, what changed since the monitor last looked becomes events, and a
        frontend still connected in the final publication (a killed worker) a DISCONNECTED.
        """
        worker = rec.worker
        assert worker is not None
        final = worker.stats.snapshot().plus(rec.base)
        rec.base = final.retired()
        rec.worker = None
        # The worker removes its socket on a clean exit; a killed one leaves it behind.
        rec.socket.unlink(missing_ok=True)
        worker.stats.close()
        with contextlib.suppress(OSError):
            os.close(worker.stats_fd)
        if report and rec.last is not None:
            self._diff(rec, rec.last, final)
            if final.connected:
                self.events.emit("DISCONNECTED", device=rec.id, vm=rec.vm)
        rec.last = rec.snapshot()

    async def _restart(self, rec: DeviceRecord) -> None:
        """Start a fresh worker for an unattached device; a failure is an ERROR event."""
        if self._closing:
            return
        try:
            await self._spawn(rec)
        except BusError as err:
            log.error("device %s: no new worker: %s", rec.id, err)
            self.events.emit("ERROR", device=rec.id, error=f"cannot restart worker: {err}")

    async def delete_device(self, dev_id: str) -> None:
        """Stop the device's worker; refused while it is attached."""
        rec = self.device(dev_id)
        async with rec.lock:
            if rec.vm is not None:
                raise BusError(f"device {dev_id} is attached to VM {rec.vm}; detach it first")
            if self.devices.pop(dev_id, None) is None:
                raise BusError(f"unknown device {dev_id!r}", 404)
            await self._retire(rec, report=False)
            rec.state = "stopped"
            rec.socket.unlink(missing_ok=True)
            rec.log_path.unlink(missing_ok=True)
        self.events.emit("DEVICE_DELETED", device=dev_id)

    def snapshot(self, dev_id: str) -> DeviceSnapshot:
        """The device's counters now (cumulative over its workers)."""
        return self.device(dev_id).snapshot()

    # -- VMs --------------------------------------------------------------------------------

    def vm(self, vm_id: str) -> VmRecord:
        """The VM ``vm_id`` or a 404."""
        try:
            return self.vms[vm_id]
        except KeyError:
            raise BusError(f"unknown VM {vm_id!r}", 404) from None

    async def start_vm(self, spec: VmSpec) -> VmRecord:
        """Start a long-running guest (or adopt a QEMU by its QMP socket)."""
        vm_id = spec.id
        if vm_id is not None and vm_id in self.vms:
            raise BusError(f"VM {vm_id!r} exists", 409)
        vm_id = vm_id or self._new_id("vm", self.vms)
        if spec.qmp_socket is not None:
            return await self._adopt(vm_id, Path(spec.qmp_socket))
        workdir = self.run_dir / "vms" / vm_id
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, mode=0o700)
        try:
            config = VmConfig(
                transport=spec.transport,
                machine=spec.machine,
                accel=spec.accel,
                memory_mib=spec.memory_mib,
                cpus=spec.cpus,
                extra_args=tuple(self._vm_args(spec, workdir)),
            )
        except ValueError as err:
            shutil.rmtree(workdir, ignore_errors=True)
            raise BusError(str(err), 422) from None
        vm = Vm(config, GUEST_SCRIPT, workdir=workdir)
        try:
            await asyncio.to_thread(vm.start)
            qmp = await self._connect_qmp(vm_id, vm.qmp_socket, vm)
        except (VmError, BusError) as err:
            await asyncio.to_thread(vm.stop)
            shutil.rmtree(workdir, ignore_errors=True)
            raise BusError(f"VM {vm_id}: {err}", 500) from None
        rec = VmRecord(vm_id, qmp, vm.qmp_socket, config.machine_type, vm, workdir, "booting")
        self.vms[vm_id] = rec
        self._watch_vm(rec)
        log.info("VM %s started (pid %s, %s)", vm_id, vm.pid, rec.machine)
        try:
            await self._wait_boot(rec, spec.boot_timeout)
        except BusError:
            await self.stop_vm(vm_id)
            raise
        rec.state = "running"
        self.events.emit("VM_START", vm=vm_id, machine=rec.machine, owned=True)
        return rec

    def _vm_args(self, spec: VmSpec, workdir: Path) -> list[str]:
        args: list[str] = []
        machine = spec.machine or ("q35" if spec.transport == "pci" else "microvm")
        if machine == "q35":
            for i in range(spec.hotplug_slots):
                args += ["-device", f"pcie-root-port,id=pvbus-rp{i},chassis={i + 1}"]
        shell = workdir / "shell.sock"
        args += ["-chardev", f"socket,id=pvbus-shell,path={shell},server=on,wait=off"]
        args += ["-device", f"virtserialport,bus=vser.0,chardev=pvbus-shell,name={SHELL_PORT}"]
        return args

    async def _connect_qmp(self, vm_id: str, path: Path, vm: Vm | None = None) -> QMPClient:
        qmp = QMPClient(vm_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            try:
                await qmp.connect(str(path))
                return qmp
            except (QMPError, OSError) as err:
                if vm is not None and vm.pid is not None and not _alive(vm.pid):
                    raise BusError(f"QEMU exited: {_tail(vm.qemu_log)}", 500) from None
                if vm is None or loop.time() > deadline:
                    raise BusError(f"cannot connect to QMP at {path}: {err}", 422) from None
                await asyncio.sleep(0.05)

    async def _adopt(self, vm_id: str, path: Path) -> VmRecord:
        qmp = await self._connect_qmp(vm_id, path)
        try:
            qom_type = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
        except QMPError as err:
            await qmp.disconnect()
            raise BusError(f"QMP at {path}: {err}", 422) from None
        rec = VmRecord(vm_id, qmp, path, _machine_kind(str(qom_type)))
        self.vms[vm_id] = rec
        self._watch_vm(rec)
        self.events.emit("VM_START", vm=vm_id, machine=rec.machine, owned=False)
        return rec

    async def _wait_boot(self, rec: VmRecord, timeout: float) -> None:
        assert rec.vm is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if INIT_READY in rec.vm.console_log.read_bytes():
                    return
            except OSError:
                pass
            if rec.state == "stopped":
                raise BusError(f"VM {rec.id} stopped while booting: {rec.vm.console_tail(3)}", 500)
            if loop.time() > deadline:
                raise BusError(f"VM {rec.id} did not boot within {timeout:g} s", 500)
            await asyncio.sleep(0.1)

    def _watch_vm(self, rec: VmRecord) -> None:
        async def events() -> None:
            async for event in rec.qmp.events:
                name = event["event"]
                data: dict[str, Any] = event.get("data", {})  # type: ignore[assignment]
                if name == "DEVICE_DELETED":
                    fut = rec.deleted.get(data.get("device", ""))
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif name in ("SHUTDOWN", "GUEST_PANICKED"):
                    log.info("VM %s: %s %s", rec.id, name, data)

        async def runstate() -> None:
            while rec.qmp.runstate == Runstate.RUNNING:
                await rec.qmp.runstate_changed()
            if rec.state != "stopped":
                log.warning("VM %s: QMP connection lost", rec.id)
                await self._vm_gone(rec, "QEMU exited")

        rec.tasks = [asyncio.create_task(events()), asyncio.create_task(runstate())]

    async def _vm_gone(self, rec: VmRecord, reason: str) -> None:
        """The VM stopped (or was released): QEMU stopped if ours, its devices dropped."""
        rec.state = "stopped"
        for fut in rec.deleted.values():  # a detach waiting for the guest waits no more
            if not fut.done():
                fut.set_result(None)
        if rec.vm is not None:
            await asyncio.to_thread(rec.vm.stop)
        for dev_id in sorted(rec.devices):
            dev = self.devices.get(dev_id)
            if dev is not None:
                async with dev.lock:
                    if dev.vm == rec.id:
                        await self._unplugged(dev, rec, reason)
        rec.devices.clear()
        if self.vms.pop(rec.id, None) is not None:
            self.events.emit("VM_STOP", vm=rec.id, reason=reason)
        if rec.workdir is not None:
            shutil.rmtree(rec.workdir, ignore_errors=True)

    async def stop_vm(self, vm_id: str) -> None:
        """Stop a bus-started VM; release an adopted one (our devices unplugged first)."""
        rec = self.vm(vm_id)
        if not rec.owned:
            for dev_id in sorted(rec.devices):
                try:
                    await self.detach(dev_id)
                except BusError as err:
                    log.warning("releasing VM %s: %s", vm_id, err)
        rec.state = "stopped"
        for task in rec.tasks:
            task.cancel()
        with contextlib.suppress(QMPError, OSError):
            await rec.qmp.disconnect()
        await self._vm_gone(rec, "stopped" if rec.owned else "released")

    async def chardevs(self, vm_id: str) -> list[str]:
        """Labels of QEMU's character devices (``query-chardev``); [] once the VM stopped."""
        rec = self.vm(vm_id)
        if rec.qmp.runstate != Runstate.RUNNING:
            return []
        result: list[dict[str, Any]] = await rec.qmp.execute("query-chardev")  # type: ignore[assignment]
        return sorted(str(c["label"]) for c in result)

    # -- hot-plug ---------------------------------------------------------------------------

    async def _free_bus(self, rec: VmRecord) -> str:
        if rec.machine == "microvm":
            raise BusError(
                f"VM {rec.id} is a microvm (virtio-mmio): QEMU cannot hot-plug devices there; "
                "start it with --transport pci",
                422,
            )
        if rec.machine != "q35":
            return "pci.0"
        buses: list[dict[str, Any]] = await rec.qmp.execute("query-pci")  # type: ignore[assignment]
        for bus in buses:
            for dev in bus.get("devices", []):
                bridge = dev.get("pci_bridge")
                qdev = dev.get("qdev_id", "")
                if bridge is None or not qdev or bridge.get("devices") or qdev in rec.claimed:
                    continue
                return str(qdev)
        raise BusError(
            f"VM {rec.id} has no free PCIe root port (start it with more --hotplug-slots)"
        )

    async def attach(self, dev_id: str, vm_id: str) -> DeviceRecord:
        """Hot-plug device ``dev_id`` into VM ``vm_id`` (starting a worker if none runs)."""
        dev = self.device(dev_id)
        async with dev.lock:
            return await self._attach(dev, self.vm(vm_id))

    async def _attach(self, dev: DeviceRecord, rec: VmRecord) -> DeviceRecord:
        dev_id, vm_id = dev.id, rec.id
        if dev.state == "stopped":
            raise BusError(f"unknown device {dev_id!r}", 404)
        if dev.vm is not None:
            raise BusError(f"device {dev_id} is already attached to VM {dev.vm}")
        if rec.state != "running":
            raise BusError(f"VM {vm_id} is {rec.state}")
        driver = dev.type.qemu
        if driver is None:
            raise BusError(f"QEMU has no vhost-user driver for {dev.type.name} devices", 422)
        bus = await self._free_bus(rec)
        if dev.worker is not None and dev.worker.process.returncode is not None:
            self._check(dev)  # it died since the monitor last looked: ERROR, counters kept
        if dev.worker is None:
            log.info("device %s: starting a new worker to attach it", dev_id)
            await self._spawn(dev)
        assert dev.worker is not None
        chardev, qdev, netdev = f"pvbus-chr-{dev_id}", f"pvbus-dev-{dev_id}", f"pvbus-net-{dev_id}"
        dev.vm = vm_id  # claimed: the device lock keeps other attaches and detaches out
        # QEMU connects to the worker inside device_add; the monitor reports what the worker
        # saw only after DEVADD, so an attachment's events always start with it.
        dev.state = "attaching"
        rec.claimed.add(bus)
        args: dict[str, Any] = {"driver": driver.driver, "id": qdev, "bus": bus}
        args.update(driver.properties)
        queues = getattr(dev.config, driver.queues_field, None) if driver.queues_field else None
        if driver.queues_property and queues:
            args[driver.queues_property] = queues
        done: list[tuple[str, dict[str, Any]]] = []
        try:
            await rec.qmp.execute(
                "chardev-add",
                {
                    "id": chardev,
                    "backend": {
                        "type": "socket",
                        "data": {
                            "addr": {"type": "unix", "data": {"path": str(dev.socket)}},
                            "server": False,
                            **await self._reconnect(rec),
                        },
                    },
                },
            )
            done.append(("chardev-remove", {"id": chardev}))
            if driver.netdev:
                netdev_args: dict[str, Any] = {"type": "vhost-user", "id": netdev}
                netdev_args["chardev"] = chardev
                if queues and queues > 1:
                    netdev_args["queues"] = queues
                    args["mq"] = True
                await rec.qmp.execute("netdev_add", netdev_args)
                done.append(("netdev_del", {"id": netdev}))
                args["netdev"] = netdev
            else:
                args["chardev"] = chardev
            await rec.qmp.execute("device_add", args)
        except QMPError as err:
            dev.vm = None
            for cmd, cmd_args in reversed(done):
                with contextlib.suppress(QMPError):
                    await rec.qmp.execute(cmd, cmd_args)
            why = err.error.error.desc if isinstance(err, ExecuteError) else str(err)
            raise BusError(f"QEMU refused to plug {dev_id} into {vm_id}: {why}", 422) from None
        finally:
            rec.claimed.discard(bus)
            dev.state = "ready"
        dev.qdev, dev.bus = qdev, bus
        rec.devices.add(dev_id)
        log.info("device %s attached to VM %s on %s", dev_id, vm_id, bus)
        self.events.emit(
            "DEVADD", device=dev_id, vm=vm_id, bus=bus, driver=driver.driver, worker=dev.worker.pid
        )
        return dev

    async def detach(self, dev_id: str) -> DeviceRecord:
        """Hot-unplug device ``dev_id`` from its VM, then replace its worker.

        ``device_del``, wait for ``DEVICE_DELETED`` (the guest released the device),
        ``netdev_del`` (net), ``chardev-remove``, stop the worker; ``DEVDROP``; then a fresh
        worker serves the socket again for the next attach or a userspace frontend.
        """
        dev = self.device(dev_id)
        async with dev.lock:
            if dev.vm is None or dev.qdev is None:
                raise BusError(f"device {dev_id} is not attached")
            rec = self.vm(dev.vm)
            await self._unplug(dev, rec)
            await self._unplugged(dev, rec, "detached")
        return dev

    async def _unplug(self, dev: DeviceRecord, rec: VmRecord) -> None:
        assert dev.qdev is not None
        qdev = dev.qdev
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rec.deleted[qdev] = fut
        try:
            await rec.qmp.execute("device_del", {"id": qdev})
            await asyncio.wait_for(asyncio.shield(fut), _UNPLUG_TIMEOUT)
        except ExecuteError as err:
            raise BusError(f"QEMU refused to unplug {dev.id}: {err.error.error.desc}") from None
        except QMPError as err:
            if rec.state != "stopped":  # else QEMU is gone, and the device with it
                raise BusError(f"VM {rec.id}: QMP: {err}", 500) from None
        except TimeoutError:
            raise BusError(
                f"the guest in VM {rec.id} did not release {dev.id} within {_UNPLUG_TIMEOUT:g} s"
            ) from None
        finally:
            rec.deleted.pop(qdev, None)
        if dev.type.qemu is not None and dev.type.qemu.netdev:
            with contextlib.suppress(QMPError):
                await rec.qmp.execute("netdev_del", {"id": f"pvbus-net-{dev.id}"})
        with contextlib.suppress(QMPError):
            await rec.qmp.execute("chardev-remove", {"id": f"pvbus-chr-{dev.id}"})

    async def _unplugged(self, dev: DeviceRecord, rec: VmRecord, reason: str) -> None:
        """The VM let go of ``dev`` (or is gone): stop its worker, DEVDROP, start a new one.

        The old worker's last events (DISCONNECTED, the reset) come before ``DEVDROP``.
        """
        await self._retire(dev, report=True)
        rec.devices.discard(dev.id)
        dev.vm = dev.qdev = dev.bus = None
        log.info("device %s unplugged from VM %s (%s)", dev.id, rec.id, reason)
        self.events.emit("DEVDROP", device=dev.id, vm=rec.id, reason=reason)
        await self._restart(dev)

    # -- watching workers -------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL)
            self.observe()

    def observe(self) -> None:
        """Turn what changed in every worker since the last look into events now.

        The monitor does this every 50 ms; the event API does it before it answers, so a
        state the API has already shown (``connected``, a status) has its event in the list.
        """
        for dev in list(self.devices.values()):
            self._check(dev)

    def _check(self, dev: DeviceRecord) -> None:
        worker = dev.worker
        if dev.state != "ready" or worker is None:
            return
        code = worker.process.returncode
        if code is not None:
            dev.state = "failed"
            log.error("device %s: worker %d exited with %s", dev.id, worker.pid, code)
            self.events.emit(
                "ERROR",
                device=dev.id,
                vm=dev.vm,
                error=f"worker exited with {code}",
                pid=worker.pid,
                log=_tail(dev.log_path),
            )
            self._fold(dev, report=True)
            if dev.vm is not None and not self._closing:
                # QEMU reconnects to the socket (chardev-add with reconnect): a new worker
                # there takes over the guest's rings and resubmits what was in flight.
                asyncio.get_running_loop().create_task(self._revive(dev))
            return
        new = dev.snapshot()
        old = dev.last
        dev.last = new
        if old is not None:
            self._diff(dev, old, new)

    async def _revive(self, dev: DeviceRecord) -> None:
        """A worker of an attached device died: start another on its socket, unless one
        already died within :data:`_REVIVE_PAUSE` of its own restart (a crash loop)."""
        loop = asyncio.get_running_loop()
        async with dev.lock:
            if dev.worker is not None or dev.vm is None or dev.state != "failed":
                return  # detached or restarted meanwhile
            if loop.time() - dev.restarted < _REVIVE_PAUSE:
                log.error("device %s: worker died again right after a restart", dev.id)
                return
            dev.restarted = loop.time()
            try:
                await self._spawn(dev)
            except BusError as err:
                self.events.emit("ERROR", device=dev.id, vm=dev.vm, error=f"no new worker: {err}")
                return
            log.info("device %s: a new worker serves VM %s", dev.id, dev.vm)

    async def _reconnect(self, rec: VmRecord) -> dict[str, int]:
        """The socket chardev's reconnect setting for this VM's QEMU."""
        version: dict[str, Any] = await rec.qmp.execute("query-version")  # type: ignore[assignment]
        qemu = version["qemu"]
        return reconnect_setting(_RECONNECT_MS, (qemu["major"], qemu["minor"]))

    def _diff(self, dev: DeviceRecord, old: DeviceSnapshot, new: DeviceSnapshot) -> None:
        """Events for what changed between two snapshots of one device."""
        vm = dev.vm
        # Follow connections, not just the flag: a frontend that came and went between two
        # looks (workers publish less often when idle) still gets both its events. A worker
        # serves one frontend at a time, so each new one means the one before had left.
        connected = old.connected
        for _ in range(max(new.connections - old.connections, 0)):
            if connected:
                self.events.emit("DISCONNECTED", device=dev.id, vm=vm)
            self.events.emit("CONNECTED", device=dev.id, vm=vm)
            connected = True
        if connected != new.connected:
            self.events.emit("CONNECTED" if new.connected else "DISCONNECTED", device=dev.id, vm=vm)
        if new.status != old.status:
            names = _status_names(new.status, False)
            if new.status & DeviceStatus.DRIVER_OK and not old.status & DeviceStatus.DRIVER_OK:
                self.events.emit("DRIVER_OK", device=dev.id, vm=vm, status=names)
            else:
                self.events.emit("STATUS", device=dev.id, vm=vm, status=names)
        if new.needs_reset and not old.needs_reset:
            self.events.emit("NEEDS_RESET", device=dev.id, vm=vm)
        if new.total("errors") > old.total("errors"):
            self.events.emit(
                "ERROR",
                device=dev.id,
                vm=vm,
                error="request errors",
                count=new.total("errors") - old.total("errors"),
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
