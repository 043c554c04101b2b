"""The pvbus switch: an L2 learning switch between pvbus net ports (IEEE 802.1D forwarding).

:class:`LearningSwitch` is the forwarding logic alone (no I/O): it learns which port each
source address lives behind, sends known unicast to that port only and floods broadcast,
multicast and unknown unicast to every other port. Entries age out, and a port's entries go
with it.

:class:`SwitchServer` puts it on a listening ``SOCK_SEQPACKET`` Unix socket: every connection
is a port, every message one Ethernet frame. A port that cannot take a frame right now (its
socket buffer is full) loses that frame, as a real switch port would; nothing blocks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pvbus.devices.net.frames import ETH_HLEN, MAX_FRAME, format_mac
from pvbus.server.loop import EventLoop

__all__ = ["LearningSwitch", "PortStats", "SwitchServer", "listen_seqpacket"]

log = logging.getLogger(__name__)

#: Seconds a learnt address stays without traffic from it (802.1D default).
AGEING_TIME = 300.0
#: Most addresses learnt; beyond that unknown sources are flooded to, not learnt.
MAX_ENTRIES = 8192


P = TypeVar("P", bound=Hashable)


class LearningSwitch(Generic[P]):
    """Forwarding decisions of a learning switch over hashable port ids."""

    def __init__(
        self,
        *,
        ageing_time: float = AGEING_TIME,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ageing_time = ageing_time
        self.max_entries = max_entries
        self.clock = clock
        self.ports: list[P] = []
        self.table: dict[bytes, tuple[P, float]] = {}

    def add_port(self, port: P) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def remove_port(self, port: P) -> None:
        """Forget the port and every address learnt on it."""
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, (p, _) in self.table.items() if p == port]:
            del self.table[mac]

    def forward(self, port: P, frame: bytes | memoryview) -> Sequence[P]:
        """Learn from a frame that came in on ``port``; the ports it goes out on."""
        now = self.clock()
        src = bytes(frame[6:12])
        if not src[0] & 1:
            entry = self.table.get(src)
            stale = entry is None or entry[0] != port or now - entry[1] > 1.0
            if stale and (entry is not None or len(self.table) < self.max_entries):
                if entry is not None and entry[0] != port:
                    log.info("%s moved to another port", format_mac(src))
                self.table[src] = (port, now)
        dst = bytes(frame[0:6])
        if not dst[0] & 1:
            entry = self.table.get(dst)
            if entry is not None:
                out, seen = entry
                if now - seen <= self.ageing_time:
                    return () if out == port else (out,)
                del self.table[dst]
        return [p for p in self.ports if p != port]


@dataclass(slots=True)
class PortStats:
    """Counters of one switch port (frames it sent us, frames we sent it)."""

    rx_frames: int = 0
    tx_frames: int = 0
    tx_dropped: int = 0


class _Port:
    __slots__ = ("fd", "name", "sock", "stats")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.stats = PortStats()


def listen_seqpacket(path: str, backlog: int = 16) -> socket.socket:
    """A listening ``SOCK_SEQPACKET`` socket at ``path``; a stale socket file is replaced."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            else:
                raise OSError(98, f"{path} is in use by a running switch")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class SwitchServer:
    """A :class:`LearningSwitch` whose ports connect to ``listener`` (one frame a message)."""

    #: Frames read from one port per wake-up, so a busy port cannot starve the others.
    BATCH = 64

    def __init__(self, listener: socket.socket, loop: EventLoop) -> None:
        self.listener = listener
        self.loop = loop
        self.switch: LearningSwitch[int] = LearningSwitch()
        self.ports: dict[int, _Port] = {}
        self.connections = 0
        self.dropped_malformed = 0
        self._buf = bytearray(MAX_FRAME + 1)
        self._view = memoryview(self._buf)
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self.connections += 1
        port = _Port(sock, f"port{self.connections}")
        self.ports[port.fd] = port
        self.switch.add_port(port.fd)
        log.info("%s joined (%d ports)", port.name, len(self.ports))
        self.loop.add_reader(port.fd, lambda: self._readable(port))

    def _drop_port(self, port: _Port) -> None:
        if self.ports.pop(port.fd, None) is None:
            return
        self.loop.remove_reader(port.fd)
        self.switch.remove_port(port.fd)
        port.sock.close()
        log.info("%s left (%d ports)", port.name, len(self.ports))

    def _readable(self, port: _Port) -> None:
        view = self._view
        recv = port.sock.recvmsg_into
        forward = self.switch.forward
        ports = self.ports
        for _ in range(self.BATCH):
            try:
                n, _, flags, _ = recv([view])
            except BlockingIOError:
                return
            except OSError as err:
                log.info("%s: %s", port.name, err)
                self._drop_port(port)
                return
            if n == 0 and not flags & socket.MSG_TRUNC:
                self._drop_port(port)
                return
            if flags & socket.MSG_TRUNC or n < ETH_HLEN or n > MAX_FRAME:
                self.dropped_malformed += 1
                continue
            port.stats.rx_frames += 1
            frame = view[:n]
            for out_fd in forward(port.fd, frame):
                out = ports.get(out_fd)
                if out is not None:
                    self._send(out, frame)

    def _send(self, port: _Port, frame: memoryview) -> None:
        try:
            port.sock.send(frame)
        except BlockingIOError:
            port.stats.tx_dropped += 1
            return
        except OSError as err:
            log.info("%s: %s", port.name, err)
            port.stats.tx_dropped += 1
            return
        port.stats.tx_frames += 1

    def close(self) -> None:
        """Close every port and stop listening."""
        for port in list(self.ports.values()):
            self._drop_port(port)
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
