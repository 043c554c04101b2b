"""virtio-console (VIRTIO 1.2 section 5.3): one console port, or MULTIPORT with named ports.

Queues (5.3.2): port 0 has receiveq 0 and transmitq 1; with VIRTIO_CONSOLE_F_MULTIPORT the
control receiveq is 2 and the control transmitq 3, and port ``n >= 1`` has queues
``2n + 2`` and ``2n + 3``. Port 0 is the console (``hvc0`` in Linux); the other ports are
generic ports the guest sees by name (``/sys/class/virtio-ports/*/name``).

Control protocol (5.3.6.2): the driver sends DEVICE_READY; the device announces each port with
DEVICE_ADD; for each PORT_READY the device answers CONSOLE_PORT (port 0), PORT_NAME (named
ports) and PORT_OPEN when a host peer is connected. The driver's PORT_OPEN says whether a guest
process has the port open; host input waits until it does (Linux drops data for closed ports).
VIRTIO_CONSOLE_F_EMERG_WRITE (5.3.4) writes single characters through the config space.

Malformed control messages (short, unknown port, unknown event) are logged and ignored; only
a broken ring is a :class:`QueueError`.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pvbus.devices.base import COMMON_FEATURES, VirtioDevice
from pvbus.devices.console.backends import MemoryBackend, PortBackend
from pvbus.virtio.constants import DeviceId, bit
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import Buffer, DescriptorChain

log = logging.getLogger(__name__)

# Feature bits (section 5.3.3).
F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

# Control events (section 5.3.6.2).
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

EVENT_NAMES = {
    DEVICE_READY: "DEVICE_READY",
    DEVICE_ADD: "DEVICE_ADD",
    DEVICE_REMOVE: "DEVICE_REMOVE",
    PORT_READY: "PORT_READY",
    CONSOLE_PORT: "CONSOLE_PORT",
    RESIZE: "RESIZE",
    PORT_OPEN: "PORT_OPEN",
    PORT_NAME: "PORT_NAME",
}

#: struct virtio_console_control: le32 id, le16 event, le16 value.
CONTROL = struct.Struct("<IHH")
#: struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

#: Host input held for a port before its backend is paused.
INPUT_HIGH_WATER = 1 << 18
#: Guest output held for a slow host before the port stops taking more.
OUTPUT_HIGH_WATER = 1 << 18
#: Seconds between retries of a backlog the host could not take.
FLUSH_RETRY = 0.01
#: Longest port name.
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One port as configured: its host backend spec and, for generic ports, a name."""

    backend: str
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """``BACKEND[,name=NAME]``, e.g. ``socket:/run/c.sock,name=org.pvbus.ctl``."""
        backend, *opts = text.split(",")
        name = None
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "name" and value:
                name = value
            else:
                raise ValueError(f"port {text!r}: unknown option {opt!r} (use name=NAME)")
        return cls(backend, name)


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """Validated configuration: the ports (port 0 is the console) and queue size.

    ``multiport`` offers VIRTIO_CONSOLE_F_MULTIPORT; it is required for more than one port or
    for names. ``max_ports`` (default: the ports given) fixes the queue count at
    ``2 * (max_ports + 1)``.
    """

    ports: tuple[PortSpec, ...] = (PortSpec("null"),)
    multiport: bool | None = None
    max_ports: int | None = None
    queue_size: int = 1024
    cols: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("a console needs at least one port")
        if self.ports[0].name is not None:
            raise ValueError("port 0 is the console and has no name")
        names = [p.name for p in self.ports if p.name is not None]
        for name in names:
            if len(name.encode()) > MAX_NAME or "\0" in name:
                raise ValueError(f"port name {name!r} is too long or has a NUL")
        if len(set(names)) != len(names):
            raise ValueError("port names must be unique")
        if self.max_ports is not None and not len(self.ports) <= self.max_ports <= 31:
            raise ValueError(f"max-ports {self.max_ports} is not in {len(self.ports)}..31")
        if len(self.ports) > 31:
            raise ValueError("at most 31 ports")
        if self.multiport is False and (len(self.ports) > 1 or names):
            raise ValueError("several or named ports need multiport")
        qs = self.queue_size
        if qs < 2 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two in 2..32768")
        if not (0 <= self.cols < 65536 and 0 <= self.rows < 65536):
            raise ValueError("cols and rows must fit 16 bits")

    @property
    def is_multiport(self) -> bool:
        if self.multiport is not None:
            return self.multiport
        return len(self.ports) > 1 or any(p.name for p in self.ports) or bool(self.max_ports)

    @property
    def nr_ports(self) -> int:
        """max_nr_ports of the config space."""
        return (self.max_ports or len(self.ports)) if self.is_multiport else 1

    @property
    def num_queues(self) -> int:
        return 2 * (self.nr_ports + 1) if self.is_multiport else 2


def port_queues(port_id: int) -> tuple[int, int]:
    """(receiveq, transmitq) of port ``port_id`` (section 5.3.2)."""
    return (0, 1) if port_id == 0 else (2 * port_id + 2, 2 * port_id + 3)


@dataclass(eq=False)
class Port:
    """One port: its backend and what both sides have said."""

    id: int
    backend: PortBackend
    name: str | None = None
    #: The driver sent PORT_READY.
    ready: bool = False
    #: A guest process has the port open (always true without MULTIPORT).
    guest_open: bool = False
    #: Host input not yet given to the guest.
    pending: bytearray = field(default_factory=bytearray)
    #: Guest output the host has not taken yet.
    backlog: bytearray = field(default_factory=bytearray)
    paused: bool = False
    #: Bytes moved, for statistics.
    to_guest: int = 0
    from_guest: int = 0

    @property
    def is_console(self) -> bool:
        return self.id == 0


class _Host:
    """The :class:`PortHost` a backend sees: routes its calls to the device."""

    __slots__ = ("device", "port")

    def __init__(self, device: ConsoleDevice, port: Port) -> None:
        self.device = device
        self.port = port

    def host_input(self, data: bytes) -> None:
        self.device.host_input(self.port, data)

    def host_connected(self, connected: bool) -> None:
        self.device.host_connected(self.port, connected)


class ConsoleDevice(VirtioDevice):
    """A virtio-console device model; backends are given in port order (port 0 first)."""

    device_id = DeviceId.CONSOLE
    name = "console"

    def __init__(
        self, config: ConsoleConfig | None = None, backends: list[PortBackend] | None = None
    ) -> None:
        self.config = config or ConsoleConfig()
        super().__init__(self.config.num_queues, self.config.queue_size)
        if backends is None:
            backends = [MemoryBackend() for _ in self.config.ports]
        if len(backends) != len(self.config.ports):
            raise ValueError(f"{len(backends)} backends for {len(self.config.ports)} ports")
        self.multiport = self.config.is_multiport
        self.ports = [
            Port(i, b, spec.name)
            for i, (spec, b) in enumerate(zip(self.config.ports, backends, strict=True))
        ]
        self._by_queue: dict[int, tuple[Port, bool]] = {}
        for port in self.ports:
            rx, tx = port_queues(port.id)
            self._by_queue[rx] = (port, False)
            self._by_queue[tx] = (port, True)
        self._active: set[int] = set()
        self._control_out: deque[bytes] = deque()
        self._started_backends = False
        self._flush_armed = False
        self._failed: dict[int, QueueError] = {}
        self.control_errors = 0
        self.reset_device()

    def close(self) -> None:
        """Close every backend."""
        for port in self.ports:
            port.backend.close()

    # -- features and config (5.3.3, 5.3.4) -------------------------------------------------

    def device_features(self) -> int:
        features = COMMON_FEATURES | bit(F_EMERG_WRITE)
        if self.multiport:
            features |= bit(F_MULTIPORT)
        if self.config.cols or self.config.rows:
            features |= bit(F_SIZE)
        return features

    def read_config(self) -> bytes:
        return CONFIG.pack(self.config.cols, self.config.rows, self.config.nr_ports, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr: the low byte of a write at offset 8 is one character for port 0 (5.3.4).
        if offset <= EMERG_WR_OFFSET < offset + len(data):
            self._output(
                self.ports[0], data[EMERG_WR_OFFSET - offset : EMERG_WR_OFFSET - offset + 1]
            )

    # -- queue life cycle -------------------------------------------------------------------

    def _start_backends(self) -> None:
        if self._started_backends or self.reactor is None:
            return
        self._started_backends = True
        for port in self.ports:
            port.backend.start(self.reactor, _Host(self, port))

    def queue_started(self, index: int) -> None:
        self._active.add(index)
        self._failed.pop(index, None)
        self._start_backends()

    def queue_stopped(self, index: int) -> None:
        self._active.discard(index)

    def reset_device(self) -> None:
        self._active.clear()
        self._control_out.clear()
        self._failed.clear()
        for port in self.ports:
            port.ready = not self.multiport
            port.guest_open = not self.multiport
            port.pending.clear()
            self._resume(port)

    # -- the data path ----------------------------------------------------------------------

    def process(self, index: int) -> None:
        if not 0 <= index < self.num_queues:
            raise QueueError(f"queue {index} of {self.num_queues}")
        err = self._failed.pop(index, None)
        if err is not None:
            raise err
        if self.multiport and index == 2:
            self._flush_control()
        elif self.multiport and index == 3:
            self.drain(3, lambda q, m: self._control_tx())
        else:
            entry = self._by_queue.get(index)
            if entry is None:
                # Queues of ports not configured: complete what the driver posts, unused.
                self.drain(index, lambda q, m: self._discard(index))
                return
            port, is_tx = entry
            if is_tx:
                self._transmit(port)
            else:
                self._fill_rx(port)

    def _safely(self, index: int, action: str) -> None:
        """Run queue work started by the host side (not by a kick); keep a ring error for later."""
        try:
            if action == "control":
                self._flush_control()
            else:
                entry = self._by_queue[index]
                if entry[1]:
                    self._transmit(entry[0])
                else:
                    self._fill_rx(entry[0])
        except QueueError as err:
            # No transport is on this stack: the next kick raises it where the transport can
            # mark the device as needing a reset.
            log.error("console queue %d: %s", index, err)
            self._failed[index] = err

    def _pump(self, index: int, handle: Callable[[], int], more: Callable[[], bool]) -> None:
        """Like :meth:`drain` for queues the device fills or drains only while ``more()``.

        ``drain`` keeps going while chains are available; a receive queue with buffers left
        but no data (or a transmit queue held back by a backlog) must stop instead.
        """
        queue, mem = self.queues[index], self.mem
        done = 0
        while True:
            queue.set_notification(mem, False)
            done += handle()
            if not more():
                queue.set_notification(mem, True)
                break
            if not queue.set_notification(mem, True):
                break
        if done:
            self.queue_stats[index].requests += done
            self.signal(index)

    def _discard(self, index: int) -> int:
        queue, mem, done = self.queues[index], self.mem, 0
        while (chain := queue.pop(mem)) is not None:
            queue.add_used(mem, chain.head, 0)
            done += 1
        return done

    # guest -> host

    def _transmit(self, port: Port) -> None:
        _, tx = port_queues(port.id)
        if tx not in self._active:
            return
        self._pump(
            tx,
            lambda: self._take_output(port, tx),
            lambda: len(port.backlog) < OUTPUT_HIGH_WATER,
        )

    def _take_output(self, port: Port, index: int) -> int:
        queue, mem, done = self.queues[index], self.mem, 0
        while len(port.backlog) < OUTPUT_HIGH_WATER and (chain := queue.pop(mem)) is not None:
            data = _gather(chain, mem)
            queue.add_used(mem, chain.head, 0)
            done += 1
            self.queue_stats[index].bytes += len(data)
            self._output(port, data)
        if port.backlog and not self._flush_armed and self.reactor is not None:
            self._flush_armed = True
            self.reactor.call_later(FLUSH_RETRY, self._retry_backlogs)
        return done

    def _output(self, port: Port, data: bytes) -> None:
        port.from_guest += len(data)
        if not port.backend.connected:
            return  # nobody on the host side: like a serial line with no one listening
        if port.backlog:
            port.backlog += data
            return
        try:
            n = port.backend.write(data)
        except OSError as err:
            log.warning(
                "console port %d (%s): %s; output dropped", port.id, port.backend.describe(), err
            )
            return
        if n < len(data):
            port.backlog += data[n:]

    def _retry_backlogs(self) -> None:
        self._flush_armed = False
        for port in self.ports:
            if not port.backlog:
                continue
            if not port.backend.connected:
                port.backlog.clear()
            else:
                try:
                    n = port.backend.write(bytes(port.backlog))
                except OSError:
                    n = len(port.backlog)
                del port.backlog[:n]
            if len(port.backlog) < OUTPUT_HIGH_WATER:
                self._safely(port_queues(port.id)[1], "tx")
        if any(p.backlog for p in self.ports) and self.reactor is not None:
            self._flush_armed = True
            self.reactor.call_later(FLUSH_RETRY, self._retry_backlogs)

    # host -> guest

    def host_input(self, port: Port, data: bytes) -> None:
        """Bytes from the host for ``port``; delivered as the guest posts buffers."""
        port.pending += data
        self._safely(port_queues(port.id)[0], "rx")
        if len(port.pending) >= INPUT_HIGH_WATER and not port.paused:
            port.paused = True
            port.backend.pause_input()

    def _resume(self, port: Port) -> None:
        if port.paused and len(port.pending) < INPUT_HIGH_WATER // 2:
            port.paused = False
            port.backend.resume_input()

    def _fill_rx(self, port: Port) -> None:
        rx, _ = port_queues(port.id)
        if rx not in self._active or not port.pending or not port.guest_open:
            return
        self._pump(rx, lambda: self._give_input(port, rx), lambda: bool(port.pending))
        self._resume(port)

    def _give_input(self, port: Port, index: int) -> int:
        queue, mem, done = self.queues[index], self.mem, 0
        while port.pending and (chain := queue.pop(mem)) is not None:
            n = _scatter(chain, mem, port.pending)
            del port.pending[:n]
            queue.add_used(mem, chain.head, n)
            port.to_guest += n
            self.queue_stats[index].bytes += n
            done += 1
        return done

    def host_connected(self, port: Port, connected: bool) -> None:
        """The host side of ``port`` opened or closed."""
        if not connected:
            port.backlog.clear()
        if self.multiport and port.ready:
            self._send_control(port.id, PORT_OPEN, int(connected))

    # -- control queues (5.3.6.2) -----------------------------------------------------------

    def _send_control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        log.debug("console -> %s port %d value %d", EVENT_NAMES[event], port_id, value)
        self._control_out.append(CONTROL.pack(port_id, event, value) + extra)
        self._safely(2, "control")

    def _flush_control(self) -> None:
        if 2 not in self._active or not self._control_out:
            return
        self._pump(2, self._give_control, lambda: bool(self._control_out))

    def _give_control(self) -> int:
        queue, mem, done = self.queues[2], self.mem, 0
        out = self._control_out
        while out and (chain := queue.pop(mem)) is not None:
            msg = out.popleft()
            n = _scatter(chain, mem, msg)
            if n < len(msg):
                log.warning("control buffer of %d bytes for a %d-byte message", n, len(msg))
            queue.add_used(mem, chain.head, n)
            done += 1
        return done

    def _control_tx(self) -> int:
        queue, mem, done = self.queues[3], self.mem, 0
        while (chain := queue.pop(mem)) is not None:
            msg = _gather(chain, mem, CONTROL.size)
            queue.add_used(mem, chain.head, 0)
            done += 1
            if len(msg) < CONTROL.size:
                self.control_errors += 1
                log.warning("control message of %d bytes ignored", len(msg))
                continue
            self._control(*CONTROL.unpack(msg))
        return done

    def _control(self, port_id: int, event: int, value: int) -> None:
        log.debug("console <- %s port %d value %d", EVENT_NAMES.get(event, event), port_id, value)
        if event == DEVICE_READY:
            if value != 1:
                log.warning("the driver failed to initialise the console")
                return
            for port in self.ports:
                self._send_control(port.id, DEVICE_ADD, 0)
            return
        if port_id >= len(self.ports) or event not in (PORT_READY, PORT_OPEN):
            self.control_errors += 1
            log.warning("control event %s for port %d ignored", event, port_id)
            return
        port = self.ports[port_id]
        if event == PORT_READY:
            if value != 1:
                log.warning("the driver failed to add console port %d", port_id)
                return
            port.ready = True
            if port.is_console:
                self._send_control(port.id, CONSOLE_PORT, 1)
            if port.name is not None:
                self._send_control(port.id, PORT_NAME, 0, port.name.encode())
            if port.backend.connected:
                self._send_control(port.id, PORT_OPEN, 1)
        else:
            port.guest_open = bool(value)
            if port.guest_open:
                self._safely(port_queues(port.id)[0], "rx")
            else:
                port.pending.clear()
                self._resume(port)


def _gather(chain: DescriptorChain, mem: GuestMemory, limit: int | None = None) -> bytes:
    """The device-readable bytes of ``chain`` (at most ``limit``)."""
    out = bytearray()
    for addr, length in chain.readable:
        if limit is not None:
            length = min(length, limit - len(out))
        try:
            out += mem.translate(addr, length)
        except GuestMemoryError as err:
            raise QueueError(f"chain {chain.head}: {err}") from err
        if limit is not None and len(out) >= limit:
            break
    return bytes(out)


def _scatter(chain: DescriptorChain, mem: GuestMemory, data: bytes | bytearray) -> int:
    """Copy a prefix of ``data`` into the writable buffers of ``chain``; return its length."""
    done = 0
    bufs: list[Buffer] = chain.writable
    for addr, length in bufs:
        n = min(length, len(data) - done)
        if n <= 0:
            break
        try:
            mem.translate(addr, n)[:] = data[done : done + n]
        except GuestMemoryError as err:
            raise QueueError(f"chain {chain.head}: {err}") from err
        done += n
    return done
