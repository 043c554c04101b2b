"""A virtio-console driver in userspace (VIRTIO 1.2 section 5.3) over a vhost-user backend.

:class:`ConsoleClient` plays the guest: it negotiates VIRTIO_CONSOLE_F_MULTIPORT when offered,
runs the control handshake (DEVICE_READY, then PORT_READY for each DEVICE_ADD), learns which
port is the console and the ports' names, and reads and writes port data. Host-side PORT_OPEN
events show up in :attr:`ClientPort.host_connected`. :meth:`ConsoleClient.send_control` sends
any control message, malformed ones included.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pvbus.frontend._connection import (
    DeviceClient,
    FrontendError,
    FrontendQueue,
    VhostUserFrontend,
)
from pvbus.frontend._memory import GuestBuffer, MemfdMemory
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
from pvbus.virtio.constants import F_EVENT_IDX, F_VERSION_1, bit

__all__ = ["DRIVER_FEATURES", "ClientPort", "ConsoleClient", "ConsoleClientError"]

F_MULTIPORT = 1
F_EMERG_WRITE = 2
DRIVER_FEATURES = bit(F_VERSION_1) | bit(F_EVENT_IDX) | bit(F_MULTIPORT) | bit(F_EMERG_WRITE)

DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7

_CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")
_BUF = 4096


class ConsoleClientError(FrontendError):
    """The device did not answer as the protocol says, or not in time."""


@dataclass(eq=False)
class ClientPort:
    """What the driver knows of one port."""

    id: int
    name: str | None = None
    is_console: bool = False
    host_connected: bool = False
    received: bytearray = field(default_factory=bytearray)


class _Ring:
    """A queue with fixed-size buffers from one area (device-writable or device-readable)."""

    def __init__(self, queue: FrontendQueue, memory: MemfdMemory, writable: bool) -> None:
        self.queue = queue
        self.area: GuestBuffer = memory.alloc(queue.ring.size * _BUF, 4096)
        self.free = list(range(queue.ring.size - 1, -1, -1))
        self.slot_of: dict[int, int] = {}
        if writable:
            while self.free:
                self.post_writable()
            queue.publish()

    def post_writable(self) -> None:
        slot = self.free.pop()
        head = self.queue.ring.add([], [(self.area.gpa + slot * _BUF, _BUF)])
        self.slot_of[head] = slot

    def used(self) -> list[bytes]:
        """Data of the buffers the device returned; device-writable ones are reposted."""
        ring = self.queue.ring
        out: list[bytes] = []
        while used := ring.get_used():
            for head, length in used:
                slot = self.slot_of.pop(head)
                off = slot * _BUF
                out.append(bytes(self.area.view[off : off + min(length, _BUF)]))
                self.free.append(slot)
            ring.set_interrupts(True)
        return out

    def send(self, data: bytes) -> None:
        for start in range(0, max(len(data), 1), _BUF):
            while not self.free:
                self.used()
                if not self.free:
                    raise ConsoleClientError("transmit queue full")
            slot = self.free.pop()
            chunk = data[start : start + _BUF]
            off = slot * _BUF
            self.area.view[off : off + len(chunk)] = chunk
            head = self.queue.ring.add([(self.area.gpa + off, len(chunk))])
            self.slot_of[head] = slot
        self.queue.publish()


class ConsoleClient(DeviceClient):
    """A userspace virtio-console driver on one vhost-user backend socket."""

    wait_error = ConsoleClientError

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        queue_size: int = 32,
        driver_features: int = DRIVER_FEATURES,
        timeout: float = 5.0,
    ) -> None:
        self.frontend = frontend
        self.timeout = timeout
        self.features = frontend.negotiate(driver_features)
        if not self.features & bit(F_VERSION_1):
            raise FrontendError("the backend does not offer VIRTIO_F_VERSION_1")
        self.multiport = bool(self.features & bit(F_MULTIPORT))
        config = frontend.get_config(_CONFIG.size)
        nr = _CONFIG.unpack(config)[2] if config and self.multiport else 1
        self.max_ports = max(nr, 1)
        nqueues = 2 * (self.max_ports + 1) if self.multiport else 2
        self.memory = MemfdMemory(nqueues * queue_size * (_BUF + 64) + (1 << 20))
        frontend.set_memory(self.memory)
        self._rx: dict[int, _Ring] = {}
        self._tx: dict[int, _Ring] = {}
        self.ports: dict[int, ClientPort] = {}
        self._events: list[tuple[int, int, int]] = []
        for port in range(self.max_ports):
            rx, tx = (0, 1) if port == 0 else (2 * port + 2, 2 * port + 3)
            self._rx[port] = _Ring(frontend.start_queue(rx, queue_size), self.memory, True)
            self._tx[port] = _Ring(frontend.start_queue(tx, queue_size), self.memory, False)
        self._crx: _Ring | None = None
        self._ctx: _Ring | None = None
        if self.multiport:
            self._crx = _Ring(frontend.start_queue(2, queue_size), self.memory, True)
            self._ctx = _Ring(frontend.start_queue(3, queue_size), self.memory, False)
            frontend.sync()
            self.send_control(0, DEVICE_READY, 1)
        else:
            self.ports[0] = ClientPort(0, is_console=True, host_connected=True)
            frontend.sync()

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        queue_size: int = 32,
        driver_features: int = DRIVER_FEATURES,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
        timeout: float = 5.0,
    ) -> ConsoleClient:
        """Connect to the backend listening at ``path`` and start the device."""
        return cls._open(
            path,
            connect_timeout=timeout,
            protocol_features=protocol_features,
            packed=packed,
            queue_size=queue_size,
            driver_features=driver_features,
            timeout=timeout,
        )

    # -- control ----------------------------------------------------------------------------

    def send_control(self, port: int, event: int, value: int, raw: bytes | None = None) -> None:
        """Send one control message (``raw``: these bytes instead of a well-formed one)."""
        if self._ctx is None:
            raise ConsoleClientError("no control queue without MULTIPORT")
        self._ctx.send(_CONTROL.pack(port, event, value) if raw is None else raw)

    def _on_control(self, msg: bytes) -> None:
        if len(msg) < _CONTROL.size:
            raise ConsoleClientError(f"control message of {len(msg)} bytes")
        port_id, event, value = _CONTROL.unpack_from(msg)
        self._events.append((port_id, event, value))
        if event == DEVICE_ADD:
            if port_id >= self.max_ports or port_id in self.ports:
                raise ConsoleClientError(f"DEVICE_ADD for port {port_id}")
            self.ports[port_id] = ClientPort(port_id)
            self.send_control(port_id, PORT_READY, 1)
            return
        port = self.ports.get(port_id)
        if port is None:
            raise ConsoleClientError(f"event {event} for unknown port {port_id}")
        if event == CONSOLE_PORT:
            port.is_console = bool(value)
            self.send_control(port_id, PORT_OPEN, 1)  # like Linux: a console is always open
        elif event == PORT_NAME:
            port.name = msg[_CONTROL.size :].decode()
        elif event == PORT_OPEN:
            port.host_connected = bool(value)
        elif event == DEVICE_REMOVE:
            del self.ports[port_id]

    def poll(self) -> None:
        """Handle what the device returned: control events, received data, sent buffers."""
        for ring in self._tx.values():
            ring.used()
        if self._ctx is not None:
            self._ctx.used()
        if self._crx is not None:
            msgs = self._crx.used()
            for msg in msgs:
                self._on_control(msg)
            if msgs:
                while self._crx.free:
                    self._crx.post_writable()
                self._crx.queue.publish()
        for port_id, ring in self._rx.items():
            data = ring.used()
            if data:
                port = self.ports.get(port_id)
                if port is None:
                    raise ConsoleClientError(f"data for port {port_id} before DEVICE_ADD")
                port.received += b"".join(data)
                while ring.free:
                    ring.post_writable()
                ring.queue.publish()

    def _polled_queues(self) -> list[FrontendQueue]:
        rings = [*self._rx.values(), *self._tx.values()]
        rings += [r for r in (self._crx, self._ctx) if r is not None]
        return [r.queue for r in rings]

    def wait_ready(
        self, count: int | None = None, names: Iterable[str] = ()
    ) -> dict[int, ClientPort]:
        """Wait until ``count`` ports (default: max_nr_ports) were added and ``names`` known."""
        want = self.max_ports if count is None else count
        wanted = set(names)

        def ready() -> bool:
            known = {p.name for p in self.ports.values()}
            return len(self.ports) >= want and wanted <= known

        self.wait_for(ready, f"{want} ports named {sorted(wanted)}")
        return self.ports

    def port(self, name: str) -> ClientPort:
        """The port called ``name``."""
        for port in self.ports.values():
            if port.name == name:
                return port
        raise KeyError(name)

    # -- data -------------------------------------------------------------------------------

    def open(self, port: int, is_open: bool = True) -> None:
        """Tell the device a guest process opened (or closed) ``port`` (PORT_OPEN)."""
        self.send_control(port, PORT_OPEN, int(is_open))

    def write(self, port: int, data: bytes) -> None:
        """Send ``data`` to the host side of ``port``."""
        self._tx[port].send(data)

    def read(self, port: int, size: int, timeout: float | None = None) -> bytes:
        """Exactly ``size`` bytes from ``port`` (raises on timeout)."""
        self.wait_for(
            lambda: port in self.ports and len(self.ports[port].received) >= size,
            f"{size} bytes on port {port}",
            timeout,
        )
        received = self.ports[port].received
        out = bytes(received[:size])
        del received[:size]
        return out

    def emergency_write(self, char: int) -> None:
        """VIRTIO_CONSOLE_F_EMERG_WRITE: one character through the config space."""
        self.frontend.set_config(8, struct.pack("<I", char))
