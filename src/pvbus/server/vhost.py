"""A vhost-user backend on a Unix socket (vhost-user.rst "Communication").

One frontend at a time: while a frontend is connected the listening socket is not watched, so
a second frontend waits in the backlog and is accepted after the first disconnects (a
restarted QEMU reconnects this way). A protocol error closes that connection only; the device
and the listening socket stay.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from pvbus.devices.base import VirtioDevice
from pvbus.server.loop import EventLoop
from pvbus.vhost_user.backend import BackendSession, Limits
from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import ProtocolError, RemoteProtocolError
from pvbus.virtio.errors import VirtioError

log = logging.getLogger(__name__)

#: Most fds one vhost-user message carries (a full memory table).
MAX_FDS = 8
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: Longest Unix socket path, with its terminating NUL (sizeof sun_path).
_SUN_PATH_MAX = 108


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket file is replaced.

    Raises :class:`OSError` (EADDRINUSE) if something is listening there already.
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            else:
                raise OSError(errno.EADDRINUSE, f"{path} is in use by a running backend")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Bind under a temporary name and link it in once listening, so the path never names a
    # socket that refuses connections (a frontend may connect as soon as the file appears).
    tmp = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
        tmp = path
    try:
        sock.bind(tmp)
        sock.listen(backlog)
        if tmp != path:
            try:
                os.link(tmp, path)  # unlike rename, never replaces a socket bound meanwhile
            except FileExistsError as err:
                raise OSError(errno.EADDRINUSE, f"{path} is in use") from err
            finally:
                os.unlink(tmp)
    except OSError:
        sock.close()
        if tmp != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return sock


class VhostUserServer:
    """Serves ``device`` to one vhost-user frontend at a time on ``listener``."""

    def __init__(
        self,
        device: VirtioDevice,
        listener: socket.socket,
        loop: EventLoop,
        limits: Limits | None = None,
    ) -> None:
        self.device = device
        self.listener = listener
        self.loop = loop
        self.limits = limits or Limits()
        self.conn: socket.socket | None = None
        self.session: BackendSession | None = None
        self.reader: MessageReader | None = None
        self.connections = 0
        self._kick_fds: dict[int, int] = {}
        device.interrupt = self._interrupt
        device.requeue = self._requeue
        device.reactor = loop
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    # -- connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self.loop.remove_reader(self.listener.fileno())
        self.conn = conn
        limits = self.limits
        self.session = BackendSession(
            self.device, self, max_mem_slots=limits.max_mem_slots, max_memory=limits.max_memory
        )
        self.reader = MessageReader("backend")
        self.connections += 1
        log.info("frontend connected (connection %d)", self.connections)
        self.loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        conn, reader, session = self.conn, self.reader, self.session
        assert conn is not None and reader is not None and session is not None
        try:
            data, ancdata, msg_flags, _ = conn.recvmsg(4096, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        except OSError as err:
            log.warning("frontend connection failed: %s", err)
            self.disconnect()
            return
        fds = _fds_of(ancdata)
        if not data:
            for fd in fds:
                os.close(fd)
            log.info("frontend disconnected")
            self.disconnect()
            return
        try:
            if msg_flags & socket.MSG_CTRUNC:
                raise RemoteProtocolError("more fds than any message carries", tuple(fds))
            reader.receive_data(data, fds)
            while (msg := reader.next_message()) is not None:
                log.debug("<- %s %s fds=%s", msg.request.name, msg.payload, msg.fds)
                reply = session.handle(msg)
                if reply is not None:
                    log.debug("-> %s %s", reply.request.name, reply.payload)
                    payload, reply_fds = encode(reply)
                    try:
                        if reply_fds:
                            socket.send_fds(conn, [payload], list(reply_fds))
                        else:
                            conn.sendall(payload)
                    finally:
                        for fd in reply_fds:  # the peer has its own copies now
                            _close(fd)
        except ProtocolError as err:
            if isinstance(err, RemoteProtocolError):
                for fd in err.fds:
                    _close(fd)
            log.error("vhost-user protocol error: %s; closing the connection", err)
            self.disconnect()
        except (OSError, VirtioError) as err:
            log.error("vhost-user connection error: %s; closing the connection", err)
            self.disconnect()

    def disconnect(self) -> None:
        """Drop the frontend: stop rings, unmap memory, accept the next one."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.reader is not None:
            for fd in self.reader.close():
                _close(fd)
            self.reader = None
        if self.conn is not None:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()
            self.conn = None
            with contextlib.suppress(OSError, ValueError):
                self.loop.add_reader(self.listener.fileno(), self._accept)

    def close(self) -> None:
        """Disconnect and stop listening."""
        self.disconnect()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()

    # -- rings (RingListener) ---------------------------------------------------------------

    def ring_started(self, index: int, kick_fd: int | None) -> None:
        if kick_fd is None:
            self.loop.pollers[(self, index)] = self._kick_handler(index, None)
        else:
            self._kick_fds[index] = kick_fd
            self.loop.add_reader(kick_fd, self._kick_handler(index, kick_fd))
        # Buffers made available before the ring started get no kick of their own.
        self._process(index)

    def ring_stopped(self, index: int) -> None:
        self.loop.pollers.pop((self, index), None)
        fd = self._kick_fds.pop(index, None)
        if fd is not None:
            self.loop.remove_reader(fd)

    def _kick_handler(self, index: int, kick_fd: int | None) -> Callable[[], None]:
        """The callback of one ring's kick: the whole per-kick path is this one frame plus
        the device's ``process`` (no method lookups, no re-binding checks)."""
        process = self.device.process
        failed = self._failed
        stats = self.device.queue_stats[index]
        if kick_fd is None:

            def polled() -> None:
                stats.kicks += 1
                try:
                    process(index)
                except Exception as err:
                    failed(index, err)

            return polled
        read = os.eventfd_read

        def kicked() -> None:
            try:
                read(kick_fd)
            except BlockingIOError:
                return
            stats.kicks += 1
            try:
                process(index)
            except Exception as err:
                failed(index, err)

        return kicked

    def _requeue(self, index: int) -> None:
        """Come back to queue ``index`` after the other ready work: kick it ourselves, so the
        loop's next epoll round sees it beside the others (a polled ring needs nothing)."""
        fd = self._kick_fds.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def _process(self, index: int) -> None:
        try:
            self.device.process(index)
        except Exception as err:
            self._failed(index, err)

    def _failed(self, index: int, err: Exception) -> None:
        """A device must never take the backend down: the ring fails, the backend stays."""
        self.device.queue_stats[index].errors += 1
        if not isinstance(err, VirtioError):
            log.exception("device error on queue %d", index, exc_info=err)
        if self.session is not None:
            self.session.ring_failed(index, err)

    def _interrupt(self, index: int) -> None:
        session = self.session
        if session is None:
            return
        fd = session.rings[index].call_fd
        if fd is not None:
            self.device.queue_stats[index].calls += 1
            try:
                os.eventfd_write(fd, 1)
            except OSError as err:
                log.warning("call eventfd of queue %d: %s", index, err)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
