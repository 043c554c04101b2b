"""Host sides of console ports: a Unix socket, a log file, the terminal, or memory (tests).

A backend moves bytes between one port and something on the host. It never blocks: input is
watched with the device's :class:`~pvbus.devices.base.Reactor` and handed to the port; output
is written without blocking and what the host cannot take yet stays in a backlog the port
flushes later (the port stops taking the guest's output while the backlog is large).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from typing import Protocol

from pvbus.devices.base import Reactor

log = logging.getLogger(__name__)

#: Bytes read from the host at once.
READ_SIZE = 65536


class PortHost(Protocol):
    """What a backend calls on its port."""

    def host_input(self, data: bytes) -> None:
        """Bytes for the guest."""

    def host_connected(self, connected: bool) -> None:
        """The host side opened or closed (VIRTIO_CONSOLE_PORT_OPEN to the guest)."""


class PortBackend:
    """Base class: a backend with no input that takes all output (and drops it)."""

    #: Whether something on the host is there to talk to.
    connected = True

    def start(self, reactor: Reactor, host: PortHost) -> None:
        """Begin watching the host side; input goes to ``host``."""

    def write(self, data: bytes) -> int:
        """Send guest output without blocking; return how many bytes were taken."""
        return len(data)

    def pause_input(self) -> None:
        """Stop reading the host side (the guest is not taking input)."""

    def resume_input(self) -> None:
        """Read the host side again."""

    def close(self) -> None:
        """Release everything."""

    def describe(self) -> str:
        return "null"


class MemoryBackend(PortBackend):
    """Output collected in :attr:`output`; input injected with :meth:`feed` (for tests)."""

    def __init__(self, connected: bool = True) -> None:
        self.output = bytearray()
        self.connected = connected
        self.host: PortHost | None = None
        self.paused = False
        #: Most bytes :meth:`write` takes per call (``None``: all), to test backlogs.
        self.accept: int | None = None

    def start(self, reactor: Reactor, host: PortHost) -> None:
        self.host = host

    def feed(self, data: bytes) -> None:
        assert self.host is not None, "backend not started"
        self.host.host_input(data)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        if self.host is not None:
            self.host.host_connected(connected)

    def write(self, data: bytes) -> int:
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.output += data[:n]
        return n

    def pause_input(self) -> None:
        self.paused = True

    def resume_input(self) -> None:
        self.paused = False

    def describe(self) -> str:
        return "memory"


class FileBackend(PortBackend):
    """Guest output appended to a log file; no input."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ValueError(f"cannot open log file {path}: {err.strerror}") from err

    def write(self, data: bytes) -> int:
        try:
            return os.write(self.fd, data)
        except OSError as err:
            log.warning("console log %s: %s; output dropped", self.path, err.strerror)
            return len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"file:{self.path}"


class _FdBackend(PortBackend):
    """Shared logic of backends on a readable/writable fd pair (non-blocking)."""

    def __init__(self) -> None:
        self.reactor: Reactor | None = None
        self.host: PortHost | None = None
        self.in_fd = -1
        self.out_fd = -1
        self.paused = False
        self._watching = False
        self._always_ready = False

    def _watch(self) -> None:
        if self.reactor is not None and self.in_fd >= 0 and not self.paused and not self._watching:
            self._watching = True
            try:
                self.reactor.add_reader(self.in_fd, self._readable)
            except PermissionError:
                # epoll cannot watch a regular file or /dev/null (EPERM): such an fd is
                # always readable, so it is read a chunk per loop round until EOF or a pause.
                self._always_ready = True
                self.reactor.call_later(0, self._read_always_ready)

    def _read_always_ready(self) -> None:
        if self._watching and self.reactor is not None:
            self._readable()
            if self._watching:
                self.reactor.call_later(0, self._read_always_ready)

    def _unwatch(self) -> None:
        if self._watching and self.reactor is not None and not self._always_ready:
            self.reactor.remove_reader(self.in_fd)
        self._watching = False

    def _readable(self) -> None:
        try:
            data = os.read(self.in_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            log.info("console %s: %s", self.describe(), err.strerror)
            data = b""
        if not data:
            self._hangup()
            return
        if self.host is not None:
            self.host.host_input(data)

    def _hangup(self) -> None:
        self._unwatch()

    def write(self, data: bytes) -> int:
        if self.out_fd < 0:
            return len(data)
        try:
            return os.write(self.out_fd, data)
        except BlockingIOError:
            return 0
        except OSError as err:
            if err.errno in (errno.EPIPE, errno.ECONNRESET):
                self._hangup()
                return len(data)
            raise

    def pause_input(self) -> None:
        self.paused = True
        self._unwatch()

    def resume_input(self) -> None:
        self.paused = False
        self._watch()


class StdioBackend(_FdBackend):
    """The serving process's own stdin and stdout (a terminal or pipes)."""

    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        super().__init__()
        self.in_fd, self.out_fd = in_fd, out_fd
        os.set_blocking(out_fd, False)
        self._was_blocking = os.get_blocking(in_fd)
        os.set_blocking(in_fd, False)

    def start(self, reactor: Reactor, host: PortHost) -> None:
        self.reactor, self.host = reactor, host
        self._watch()

    def _hangup(self) -> None:
        self._unwatch()
        self.in_fd = -1

    def close(self) -> None:
        self._unwatch()
        if self._was_blocking and self.in_fd >= 0:
            with contextlib.suppress(OSError):
                os.set_blocking(self.in_fd, True)

    def describe(self) -> str:
        return "stdio"


class SocketBackend(_FdBackend):
    """A Unix socket the backend listens on; one host client at a time is the port's peer.

    The socket exists from construction on, so a client may connect before the guest is up.
    A client that connects while another is attached waits in the backlog.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(path)
            self.listener.listen(4)
        except OSError as err:
            self.listener.close()
            raise ValueError(f"cannot listen on {path}: {err.strerror}") from err
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.connected = False

    def start(self, reactor: Reactor, host: PortHost) -> None:
        self.reactor, self.host = reactor, host
        reactor.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        assert self.reactor is not None
        self.reactor.remove_reader(self.listener.fileno())
        self.conn = conn
        self.in_fd = self.out_fd = conn.fileno()
        self.connected = True
        log.info("console %s: client connected", self.path)
        self._watch()
        if self.host is not None:
            self.host.host_connected(True)

    def _hangup(self) -> None:
        self._unwatch()
        if self.conn is None:
            return
        log.info("console %s: client disconnected", self.path)
        self.conn.close()
        self.conn = None
        self.in_fd = self.out_fd = -1
        self.connected = False
        if self.reactor is not None:
            self.reactor.add_reader(self.listener.fileno(), self._accept)
        if self.host is not None:
            self.host.host_connected(False)

    def close(self) -> None:
        self._unwatch()
        if self.reactor is not None:
            self.reactor.remove_reader(self.listener.fileno())
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def describe(self) -> str:
        return f"socket:{self.path}"


def open_backend(spec: str) -> PortBackend:
    """``socket:PATH``, ``file:PATH``, ``stdio`` or ``null``; raises ValueError."""
    kind, _, arg = spec.partition(":")
    if kind == "socket" and arg:
        return SocketBackend(arg)
    if kind == "file" and arg:
        return FileBackend(arg)
    if spec == "stdio":
        return StdioBackend()
    if spec == "null":
        return PortBackend()
    raise ValueError(f"port backend {spec!r}: use socket:PATH, file:PATH, stdio or null")
