"""Run a command in a throw-away guest: backends + QEMU + output port, as :class:`Vm`.

The command's output arrives on a vsock stream: the guest's init connects to host port
:data:`COMMAND_PORT` through the pvbus vsock device, which maps it to a Unix socket this
module listens on. If the guest cannot connect, or with ``command_channel="serial"``, it comes
on a virtio-serial port (``org.pvbus.out``) that QEMU connects to another Unix socket. Either
way it is passed on live and ends with a per-run random marker followed by the exit status.
The kernel console goes to ``console.log`` and is only read to explain failures.

With no command the guest runs an interactive shell on ``hvc0`` instead, and
:meth:`Vm.interact` relays the user's terminal to it (:mod:`pvbus.vm.terminal`). ``hvc0`` is
pvbus's console device where QEMU can render it (the generic ``vhost-user-device``), else
QEMU's own ``virtconsole``.

Where this QEMU cannot render pvbus's vsock device on the transport (ccw: QEMU has no
vhost-user vsock on CCW) the command channel is the virtio-serial port from the start.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from pvbus.vm.accel import choose_accel
from pvbus.vm.backends import Backend, BackendError, start_backend
from pvbus.vm.devices import (
    DeviceBackend,
    DeviceSpec,
    creatable,
    start_device,
    unsupported_reason,
)
from pvbus.vm.guest import GuestImage, command_archive, default_guest
from pvbus.vm.qemu import VmConfig, VmPaths, blk_device, host_tsc_khz, qemu_argv
from pvbus.vm.terminal import TerminalRelay, raw_terminal, terminal_size

__all__ = [
    "CommandTimeoutError",
    "GuestBootError",
    "RunResult",
    "Vm",
    "VmError",
    "VmState",
    "command_script",
    "run_command",
]

log = logging.getLogger(__name__)

#: Host vsock port the guest's init connects to for the command's output (vsock channel).
COMMAND_PORT = 1024
#: The guest's CID when the runner adds the vsock device.
GUEST_CID = 3

#: What ``/init`` prints on the console right before it starts the command.
INIT_READY = b"pvbus-init: running command"

OutputSink = Callable[[bytes], None]


class VmError(Exception):
    """The VM could not run the command; the message is one line a person can act on."""


class GuestBootError(VmError):
    """The guest did not reach its init; ``console_tail`` shows how far it got."""

    def __init__(self, message: str, console_tail: str) -> None:
        super().__init__(message)
        self.console_tail = console_tail


class CommandTimeoutError(VmError):
    """The command did not finish in time (partial output is in ``output``)."""

    def __init__(self, message: str, output: bytes) -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True, slots=True)
class RunResult:
    """The command's combined stdout+stderr, exit status and timings in seconds."""

    output: bytes
    status: int
    elapsed: float
    boot_seconds: float | None = None


class VmState(enum.Enum):
    """Lifecycle of a :class:`Vm`."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


def command_script(argv: Sequence[str]) -> str:
    """The ``sh -c`` script for ``argv``: one word is a script, more are quoted as a command."""
    if not argv:
        raise ValueError("no command given")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _prefix_overlap(data: bytes, marker: bytes) -> int:
    """Length of the longest tail of ``data`` that is a proper prefix of ``marker``."""
    for n in range(min(len(data), len(marker) - 1), 0, -1):
        if data.endswith(marker[:n]):
            return n
    return 0


@functools.cache
def qemu_version(qemu: str) -> tuple[int, int]:
    """(major, minor) of ``qemu --version``; (0, 0) if it cannot be read."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class _MarkerStream:
    """Splits the port's byte stream into output and the trailing ``<marker> <status>``."""

    def __init__(self, marker: bytes, sink: OutputSink | None) -> None:
        self._marker = marker
        self._sink = sink
        self._pending = b""
        self.output = bytearray()
        self.status: int | None = None
        self._pattern = re.compile(re.escape(marker) + rb" (-?\d+)\n")

    def feed(self, data: bytes) -> None:
        if self.status is not None:
            return
        self._pending += data
        idx = self._pending.find(self._marker)
        if idx >= 0:
            self._emit(self._pending[:idx])
            self._pending = self._pending[idx:]
            m = self._pattern.match(self._pending)
            if m:
                self.status = int(m.group(1))
            return
        # Hold back only a tail that could be the start of the marker, so output that
        # pauses (an interactive or long-running command) is never stuck in here.
        keep = _prefix_overlap(self._pending, self._marker)
        self._emit(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]

    def _emit(self, data: bytes) -> None:
        if data:
            self.output += data
            if self._sink is not None:
                self._sink(data)


class Vm:
    """One QEMU guest with pvbus (or qsd) disks, running one command then powering off.

    Use as a context manager, or :meth:`start` then :meth:`wait` and always :meth:`stop`.
    With ``command=None`` the guest runs a shell on ``hvc0``: :meth:`start`, then
    :meth:`interact`.
    """

    def __init__(
        self,
        config: VmConfig,
        command: str | None,
        *,
        guest: GuestImage | None = None,
        workdir: Path | None = None,
        terminal_fd: int = 0,
    ) -> None:
        self.config = config
        self.command = command
        #: The terminal whose type and size an interactive guest shell is set up for.
        self.terminal_fd = terminal_fd
        #: Who renders the interactive shell's ``hvc0``: "pvbus" or "qemu" (set by start).
        self.console_renderer = ""
        self._guest = guest
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pvbus-vm-"))
        self.state = VmState.CREATED
        self._marker = "PVBUS-EXIT-" + secrets.token_hex(12)
        self._backends: list[Backend] = []
        self.backend_restarts = 0
        self._qemu: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        #: Where the guest's vsock connection to :data:`COMMAND_PORT` arrives (vsock channel).
        self._vsock_listener: socket.socket | None = None
        self._vsock_path: Path | None = None
        self._devices: list[DeviceBackend] = []
        self._started = 0.0
        self.accel = ""

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        return self._qemu.pid if self._qemu is not None else None

    @property
    def qmp_socket(self) -> Path:
        """QMP server socket of the running QEMU (``qemu.qmp`` can connect to it)."""
        return self.workdir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        """The host end of the guest's ``hvc0`` (interactive VMs)."""
        return self.workdir / "hvc0.sock"

    @property
    def console_log(self) -> Path:
        """The guest's kernel console (ttyS0)."""
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.workdir / "qemu.log"

    def console_tail(self, lines: int = 15) -> str:
        """The last lines of the kernel console."""
        try:
            text = self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _booted(self) -> bool:
        try:
            return INIT_READY in self.console_log.read_bytes()
        except OSError:
            return False

    def start(self) -> None:
        """Start the disk backends, then QEMU; returns once QEMU runs."""
        if self.state is not VmState.CREATED:
            raise VmError(f"cannot start a VM that is {self.state.value}")
        qemu = shutil.which(self.config.qemu)
        if qemu is None:
            package = "qemu-system-s390x" if self.config.transport == "ccw" else "qemu-system-x86"
            raise VmError(f"{self.config.qemu} not found (install {package})")
        for disk in self.config.disks:
            if not disk.path.is_file():
                raise VmError(f"disk image {disk.path} does not exist")
        blk = blk_device(self.config.transport)
        if self.config.disks and not creatable(blk, qemu):
            raise VmError(
                f"{self.config.qemu} cannot create {blk}: QEMU has no vhost-user-blk on "
                f"{self.config.transport}, so disks cannot be rendered there"
            )
        self.state = VmState.RUNNING
        arch = self.config.arch
        guest = self._guest or default_guest(suite=self.config.kernel_suite, arch=arch)
        if guest.arch != arch:
            raise VmError(f"the {self.config.transport} transport needs an {arch} guest")
        accel = choose_accel(self.config.accel, guest_arch=arch)
        self.accel = accel.name
        log.info("accelerator %s (%s)", accel.name, accel.reason)
        initrd = self.workdir / "initrd.img"
        base = guest.initramfs.read_bytes()
        base += b"\0" * (-len(base) % 4)
        interactive = self.command is None
        use_vsock = self.config.command_channel == "vsock" and not interactive
        probe = DeviceSpec.vsock(self.workdir / "vsock.sock")
        if use_vsock and unsupported_reason(probe, self.config.transport, qemu) is not None:
            use_vsock = False  # this QEMU cannot render it here: the virtio-serial port
        vsock_port = COMMAND_PORT if use_vsock else None
        size = terminal_size(self.terminal_fd)
        term = os.environ.get("TERM", "vt100")
        archive = command_archive(self.command, self._marker, vsock_port, term=term, size=size)
        initrd.write_bytes(base + archive)
        sockets: list[Path] = []
        for i, disk in enumerate(self.config.disks):
            if disk.socket is not None:
                sockets.append(disk.socket)
                continue
            sock = self.workdir / f"disk{i}.sock"
            try:
                backend = start_backend(
                    self.config.disk_backend, disk, sock, self.workdir / f"disk{i}.log"
                )
            except BackendError as err:
                raise VmError(str(err)) from err
            self._backends.append(backend)
            sockets.append(sock)
        out_sock = self.workdir / "out.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(out_sock))
        self._listener.listen(1)
        runner_devices: tuple[DeviceSpec, ...] = ()
        if use_vsock:
            # The vsock device maps guest connections to host port P to <uds>_P. A guest has
            # one vsock transport: reuse a vsock device the config asks for, else add one.
            given = [d.option("uds-path") for d in self.config.devices if d.kind == "vsock"]
            uds = Path(given[0]) if given and given[0] else self.workdir / "vsock.sock"
            if not given:
                runner_devices = (DeviceSpec.vsock(uds, GUEST_CID),)
            self._vsock_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._vsock_path = Path(f"{uds}_{COMMAND_PORT}")
            self._vsock_path.unlink(missing_ok=True)
            self._vsock_listener.bind(str(self._vsock_path))
            self._vsock_listener.listen(1)
        qemu_console: Path | None = None
        if interactive:
            console = DeviceSpec.console(f"socket:{self.console_socket}")
            if unsupported_reason(console, self.config.transport, qemu) is None:
                runner_devices += (console,)
                self.console_renderer = "pvbus"
            else:
                qemu_console = self.console_socket
                self.console_renderer = "qemu"
        device_sockets: list[Path] = []
        for i, spec in enumerate(self.config.devices + runner_devices):
            reason = unsupported_reason(spec, self.config.transport, qemu)
            if reason is not None:
                raise VmError(reason)
            sock = self.workdir / f"dev{i}.sock"
            try:
                self._devices.append(start_device(spec, sock, self.workdir / f"dev{i}.log"))
            except RuntimeError as err:
                raise VmError(str(err)) from err
            device_sockets.append(sock)
        paths = VmPaths(
            kernel=guest.kernel,
            initrd=initrd,
            console_log=self.console_log,
            output_socket=out_sock,
            qmp_socket=self.qmp_socket,
            disk_sockets=tuple(sockets),
            device_sockets=tuple(device_sockets),
            runner_devices=runner_devices,
            console_socket=qemu_console,
        )
        argv = qemu_argv(
            self.config, paths, accel.name, host_tsc_khz(), qemu_version(self.config.qemu)
        )
        log.debug("qemu: %s", shlex.join(argv))
        self._started = time.monotonic()
        with self.qemu_log.open("wb") as qlog:
            self._qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)

    def wait(self, timeout: float | None = None, on_output: OutputSink | None = None) -> RunResult:
        """Pass output to ``on_output`` as it arrives; return once the status is known."""
        if self._qemu is None or self._listener is None:
            raise VmError("VM not started")
        stream = _MarkerStream(self._marker.encode(), on_output)
        deadline = None if timeout is None else self._started + timeout
        # The output comes on the virtio-serial port (QEMU connects at start) or on the vsock
        # stream (the vsock backend connects when the guest does); whichever carries it.
        listeners = [sock for sock in (self._listener, self._vsock_listener) if sock is not None]
        conns: list[socket.socket] = []
        boot_seconds: float | None = None
        try:
            while stream.status is None:
                now = time.monotonic()
                self.revive_backends()
                if boot_seconds is None and self._booted():
                    boot_seconds = now - self._started
                if deadline is not None and now >= deadline:
                    self._timeout(timeout or 0.0, bytes(stream.output))
                if self._qemu.poll() is not None and not conns:
                    self._died(bytes(stream.output))
                wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
                ready, _, _ = select.select(conns + listeners, [], [], wait)
                for sock in ready:
                    if sock in listeners:
                        conns.append(sock.accept()[0])
                        listeners.remove(sock)
                        continue
                    data = sock.recv(65536)
                    if not data:
                        # QEMU went away, or the guest's command stream ended with no status.
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self._qemu.wait(30)
                        self._died(bytes(stream.output))
                    stream.feed(data)
        finally:
            for conn in conns:
                conn.close()
        elapsed = time.monotonic() - self._started
        try:
            self._qemu.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("guest did not power off; stopping QEMU")
        if boot_seconds is None and self._booted():
            boot_seconds = elapsed
        return RunResult(bytes(stream.output), stream.status, elapsed, boot_seconds)

    def interact(self, in_fd: int = 0, out_fd: int = 1, boot_timeout: float | None = None) -> str:
        """Relay the terminal on ``in_fd``/``out_fd`` to the guest's shell on ``hvc0``.

        Returns ``"poweroff"`` when the guest has gone off (the shell exited) or ``"escape"``
        when the user pressed the escape key. ``boot_timeout`` bounds the boot only.
        """
        if self._qemu is None or self.command is not None:
            raise VmError("interact needs a started VM with no command")
        qemu = self._qemu
        deadline = None if boot_timeout is None else self._started + boot_timeout

        def keep_going() -> bool:
            self.revive_backends()
            if qemu.poll() is not None:
                return False
            if deadline is not None and time.monotonic() > deadline and not self._booted():
                self._timeout(boot_timeout or 0.0, b"")
            return True

        console = self._connect_console(keep_going)
        if console is None:
            self._died(b"")
        with console, raw_terminal(in_fd):
            why = TerminalRelay(console, in_fd, out_fd).run(keep_going)
        if why == "escape":
            return why
        with contextlib.suppress(subprocess.TimeoutExpired):
            qemu.wait(10)
        if not self._booted():
            self._died(b"")
        return "poweroff"

    def _connect_console(self, keep_going: Callable[[], bool]) -> socket.socket | None:
        """Connect to ``hvc0``'s socket once it listens; None if QEMU exits first."""
        while keep_going():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.console_socket))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                time.sleep(0.05)
                continue
            return sock
        return None

    @property
    def backends(self) -> list[Backend]:
        """The disk backends this VM started (not those it only connects to)."""
        return list(self._backends)

    def revive_backends(self) -> int:
        """Restart every backend that died while the VM runs; return how many.

        QEMU reconnects to the same socket path (``reconnect_ms``) and the backend resumes
        the rings from the inflight area QEMU kept, so the guest sees no error.
        """
        revived = 0
        for i, backend in enumerate(self._backends):
            status = backend.process.poll()
            if status is None or self.state is not VmState.RUNNING:
                continue
            log.warning("backend for %s died (%s); restarting it", backend.disk.path, status)
            try:
                self._backends[i] = start_backend(
                    self.config.disk_backend, backend.disk, backend.socket_path, backend.log_path
                )
            except BackendError as err:
                raise VmError(f"cannot restart the backend: {err}") from err
            self.backend_restarts += 1
            revived += 1
        return revived

    def _qemu_error(self) -> str:
        try:
            lines = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def _died(self, output: bytes) -> NoReturn:
        rc = self._qemu.returncode if self._qemu else None
        if not self._booted():
            err = self._qemu_error()
            if err and rc:
                raise VmError(f"QEMU failed ({rc}): {err}")
            raise GuestBootError("guest failed to boot", self.console_tail())
        raise VmError("guest stopped before reporting the command's status")

    def _timeout(self, timeout: float, output: bytes) -> NoReturn:
        if not self._booted():
            tail = self.console_tail()
            if not tail:
                raise GuestBootError(
                    f"QEMU did not start the guest within {timeout:g} s "
                    "(is a vhost-user backend not answering?)",
                    tail,
                )
            raise GuestBootError(
                f"guest did not boot within {timeout:g} s (accel {self.accel})", tail
            )
        raise CommandTimeoutError(f"command timed out after {timeout:g} s", output)

    def stop(self) -> None:
        """Stop QEMU and the backends, and remove the work directory if it is ours."""
        if self._qemu is not None and self._qemu.poll() is None:
            self._qemu.terminate()
            try:
                self._qemu.wait(5)
            except subprocess.TimeoutExpired:
                self._qemu.kill()
                self._qemu.wait()
        for backend in self._backends:
            status = backend.stop()
            if status not in (0, None, -15):
                log.warning("backend for %s exited with %s", backend.disk.path, status)
        self._backends.clear()
        for device in self._devices:
            status = device.stop()
            if status not in (0, None, -15):
                log.warning("pvbus serve %s exited with %s", device.spec.kind, status)
        self._devices.clear()
        if self._vsock_listener is not None:
            self._vsock_listener.close()
            self._vsock_listener = None
        if self._vsock_path is not None:
            self._vsock_path.unlink(missing_ok=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.state = VmState.STOPPED

    def __enter__(self) -> Vm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_command(
    config: VmConfig,
    argv: Sequence[str],
    timeout: float | None = None,
    *,
    on_output: OutputSink | None = None,
    guest: GuestImage | None = None,
) -> RunResult:
    """Boot a guest for ``config``, run ``argv`` in it and return its output and status."""
    vm = Vm(config, command_script(argv), guest=guest)
    try:
        vm.start()
        return vm.wait(timeout, on_output)
    finally:
        with contextlib.suppress(Exception):
            vm.stop()
