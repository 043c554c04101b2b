"""A device-agnostic vhost-user frontend connection (vhost-user.rst, front-end side).

:class:`VhostUserFrontend` is the I/O half around :class:`~pvbus.vhost_user.frontend.
FrontendSession`: a Unix socket to any vhost-user backend (pvbus, qemu-storage-daemon,
libvhost-user or rust-vmm based), memfd guest memory handed over with SET_MEM_TABLE, feature
and protocol-feature negotiation, the device config space, and split or packed virtqueues
(VIRTIO 1.2 sections 2.7, 2.8) driven through kick and call eventfds (:class:`FrontendQueue`).
Device clients (:mod:`pvbus.frontend.blk` and others) build on it, each with a ``packed``
option on ``connect``; it knows nothing of any device type.

Start-up follows what QEMU does (vhost-user.rst "Starting and stopping rings"): SET_OWNER,
GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_FEATURES, SET_MEM_TABLE, then per ring
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_KICK and, with
VHOST_USER_F_PROTOCOL_FEATURES, SET_VRING_ENABLE. A backend that hangs up fails every call with
:class:`BackendDisconnectedError`, never a hang.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from pvbus.frontend._memory import MemfdMemory
from pvbus.vhost_user.errors import ProtocolError, RemoteProtocolError
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, FrontendSession, Reply
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    ConfigSpace,
    MemTable,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
)
from pvbus.virtio.constants import F_EVENT_IDX, F_RING_PACKED
from pvbus.virtio.driver import DriverQueue, ring_layout
from pvbus.virtio.packed_driver import PackedDriverQueue, packed_ring_layout
from pvbus.virtio.queue import DriverRing

log = logging.getLogger(__name__)

_MAX_FDS = 8
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_UCRED = struct.Struct("3i")


class FrontendError(Exception):
    """The backend refused or broke something; the connection is unusable."""


class BackendDisconnectedError(FrontendError):
    """The backend closed the connection (or its process died)."""


class RequestFailedError(FrontendError):
    """The backend answered a request with a failing REPLY_ACK status."""

    def __init__(self, request: Request, status: int) -> None:
        super().__init__(f"backend failed {request.name} with status {status}")
        self.request = request
        self.status = status


@dataclass(eq=False)
class FrontendQueue:
    """One started virtqueue: the driver-side ring and its kick and call eventfds.

    ``kicks`` counts the eventfd writes to the backend, ``calls`` the interrupts it sent (the
    sum of what the call eventfd counted, so coalesced interrupts are counted one by one).
    """

    index: int
    ring: DriverRing
    kick_fd: int
    call_fd: int
    kicks: int = 0
    calls: int = 0
    _closed: bool = field(default=False, repr=False)

    def kick(self) -> None:
        """Notify the backend that buffers are available (VIRTIO 1.2 sections 2.7.13.4, 2.8.21)."""
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def publish(self) -> bool:
        """Publish the available index and kick if the backend asked for it; return whether."""
        if self.ring.publish():
            self.kick()
            return True
        return False

    def ack_calls(self) -> int:
        """Consume the interrupts the backend sent since the last time; return how many."""
        try:
            n = os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0
        self.calls += n
        return n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self.kick_fd, self.call_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


class VhostUserFrontend:
    """A connection to one vhost-user backend, driving one device.

    With ``packed`` the driver asks for VIRTIO_F_RING_PACKED and its queues are packed
    virtqueues (VIRTIO 1.2 section 2.8); :meth:`negotiate` fails if the backend does not
    offer them.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float | None = 10.0,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.wanted_protocol_features = protocol_features
        self.packed = packed
        self.session = FrontendSession()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise FrontendError(f"cannot connect to {path}: {err.strerror or err}") from err
        self.sock.settimeout(timeout)
        ucred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        #: Process id of the backend (SO_PEERCRED), for its CPU time.
        self.backend_pid: int = _UCRED.unpack(ucred)[0]
        self.memory: MemfdMemory | None = None
        self.queues: dict[int, FrontendQueue] = {}
        self.device_features = 0
        self.closed = False

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def request(
        self,
        request: Request,
        payload: U64 | VringState | VringAddr | MemTable | ConfigSpace | None = None,
        fds: tuple[int, ...] = (),
        *,
        need_reply: bool = True,
    ) -> Reply | None:
        """Send one request and wait for its reply, if one comes.

        ``need_reply`` asks for a REPLY_ACK where negotiated, so errors surface right here.
        """
        if self.closed:
            raise FrontendError("the frontend is closed")
        data, out_fds, expects = self.session.send(request, payload, fds, need_reply=need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out_fds))] if out_fds else []
        try:
            self.sock.sendmsg([data], anc)
        except OSError as err:
            raise BackendDisconnectedError(f"{request.name}: {err.strerror or err}") from err
        log.debug("-> %s %s fds=%s", request.name, payload, out_fds)
        if not expects:
            return None
        reply = self._receive_reply()
        if not reply.ok:
            assert isinstance(reply.payload, U64)
            raise RequestFailedError(request, reply.payload.value)
        return reply

    def _receive_reply(self) -> Reply:
        session = self.session
        while (reply := session.next_reply()) is None:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError as err:
                raise FrontendError(f"no reply from the backend in {self.timeout} s") from err
            except OSError as err:
                raise BackendDisconnectedError(f"backend connection: {err}") from err
            fds = _fds_of(ancdata)
            try:
                session.receive_data(data, fds)
            except RemoteProtocolError as err:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if not data:
                    raise BackendDisconnectedError(str(err)) from err
                raise FrontendError(f"backend protocol error: {err}") from err
            if not data:
                raise BackendDisconnectedError("backend closed the connection")
        log.debug("<- %s %s", reply.request.name, reply.payload)
        return reply

    def sync(self) -> None:
        """Wait until the backend handled everything sent so far (GET_FEATURES as a barrier)."""
        self.request(Request.GET_FEATURES)

    # -- negotiation ------------------------------------------------------------------------

    def negotiate(self, driver_features: int) -> int:
        """SET_OWNER and feature negotiation; return the device features acknowledged.

        ``driver_features`` are the virtio feature bits the driver understands (plus
        VIRTIO_F_RING_PACKED for a ``packed`` frontend); the result is their intersection with
        what the backend offers. VHOST_USER_F_PROTOCOL_FEATURES and the protocol features this
        frontend wants are negotiated when offered.
        """
        if self.packed:
            driver_features |= 1 << F_RING_PACKED
        self.request(Request.SET_OWNER, need_reply=False)
        reply = self.request(Request.GET_FEATURES)
        assert reply is not None and isinstance(reply.payload, U64)
        offered = reply.payload.value
        if self.packed and not offered & (1 << F_RING_PACKED):
            raise FrontendError("the backend does not offer VIRTIO_F_RING_PACKED")
        acked = offered & driver_features & ~(1 << F_PROTOCOL_FEATURES)
        if offered & (1 << F_PROTOCOL_FEATURES):
            reply = self.request(Request.GET_PROTOCOL_FEATURES)
            assert reply is not None and isinstance(reply.payload, U64)
            proto = reply.payload.value & self.wanted_protocol_features
            self.request(Request.SET_PROTOCOL_FEATURES, U64(proto))
            acked |= 1 << F_PROTOCOL_FEATURES
        self.request(Request.SET_FEATURES, U64(acked))
        self.device_features = acked & ~(1 << F_PROTOCOL_FEATURES)
        return self.device_features

    def has(self, feature: ProtocolFeature) -> bool:
        """Whether protocol ``feature`` was negotiated."""
        return self.session.has(feature)

    def get_config(self, size: int, offset: int = 0) -> bytes | None:
        """Read the device config space (None without VHOST_USER_PROTOCOL_F_CONFIG)."""
        if not self.has(ProtocolFeature.CONFIG):
            return None
        reply = self.request(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)))
        assert reply is not None and isinstance(reply.payload, ConfigSpace)
        if reply.payload.size != size:
            raise FrontendError(f"GET_CONFIG returned {reply.payload.size} of {size} bytes")
        return reply.payload.data

    def set_config(self, offset: int, data: bytes) -> None:
        """Write the device config space (needs VHOST_USER_PROTOCOL_F_CONFIG)."""
        self.request(Request.SET_CONFIG, ConfigSpace(offset, len(data), 0, data))

    def get_queue_num(self) -> int | None:
        """How many queues the backend has (None without VHOST_USER_PROTOCOL_F_MQ)."""
        if not self.has(ProtocolFeature.MQ):
            return None
        reply = self.request(Request.GET_QUEUE_NUM)
        assert reply is not None and isinstance(reply.payload, U64)
        return reply.payload.value

    # -- memory and queues ------------------------------------------------------------------

    def set_memory(self, memory: MemfdMemory) -> None:
        """Share ``memory`` with the backend (SET_MEM_TABLE); the frontend owns it after."""
        self.request(Request.SET_MEM_TABLE, MemTable((memory.table_region(),)), (memory.fd,))
        self.memory = memory

    def start_queue(self, index: int, size: int, *, base: int | None = None) -> FrontendQueue:
        """Lay out a ring of ``size`` in guest memory and start it on the backend.

        The ring is packed if VIRTIO_F_RING_PACKED was negotiated, else split. ``base`` is the
        vring base to start from (SET_VRING_BASE; by default the ring's start).
        """
        memory = self.memory
        if memory is None:
            raise FrontendError("start_queue before set_memory")
        event_idx = bool(self.device_features & (1 << F_EVENT_IDX))
        ring: DriverRing
        if self.device_features & (1 << F_RING_PACKED):
            desc, avail, used, span = packed_ring_layout(size, 0)
            area = memory.alloc(span, 4096)
            packed = PackedDriverQueue(
                memory.mem,
                size,
                area.gpa + desc,
                area.gpa + avail,
                area.gpa + used,
                event_idx=event_idx,
                base=base,
            )
            base = packed.vring_base()
            ring = packed
        else:
            desc, avail, used, span = ring_layout(size, 0)
            area = memory.alloc(span, 4096)
            split = DriverQueue(
                memory.mem,
                size,
                area.gpa + desc,
                area.gpa + avail,
                area.gpa + used,
                event_idx=event_idx,
            )
            base = base or 0
            split.avail_idx = split.kicked_avail = split.last_used = base
            ring = split
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queue = FrontendQueue(index, ring, kick_fd, call_fd)
        self.queues[index] = queue
        self.request(Request.SET_VRING_NUM, VringState(index, size))
        self.request(Request.SET_VRING_BASE, VringState(index, base))
        self.request(
            Request.SET_VRING_ADDR,
            VringAddr(
                index,
                0,
                memory.gpa_to_uaddr(ring.desc_addr),
                memory.gpa_to_uaddr(ring.used_addr),
                memory.gpa_to_uaddr(ring.avail_addr),
            ),
        )
        self.request(Request.SET_VRING_CALL, U64(index), (call_fd,))
        self.request(Request.SET_VRING_KICK, U64(index), (kick_fd,))
        if self.session.protocol_features_acked:
            self.request(Request.SET_VRING_ENABLE, VringState(index, 1))
        ring.set_interrupts(True)
        return queue

    def stop_queue(self, index: int) -> int:
        """Stop ring ``index`` (GET_VRING_BASE); return the backend's vring base (the next
        available index of a split ring, both sides' positions of a packed one)."""
        reply = self.request(Request.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None and isinstance(reply.payload, VringState)
        queue = self.queues.pop(index)
        queue.close()
        return reply.payload.num

    def wait(self, queues: list[FrontendQueue], timeout: float | None = None) -> bool:
        """Block until one of ``queues`` got an interrupt; False on timeout.

        Watches the socket too: a backend that hangs up or dies raises
        :class:`BackendDisconnectedError` instead of leaving the caller waiting forever.
        """
        poller = select.poll()
        for queue in queues:
            poller.register(queue.call_fd, select.POLLIN)
        sock_fd = self.sock.fileno()
        poller.register(sock_fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = poller.poll(None if left is None else left * 1000)
            if not events:
                return False
            for fd, _ in events:
                if fd == sock_fd:
                    self.check_alive()
                else:
                    return True

    def check_alive(self) -> None:
        """Raise if the backend hung up (or sent something unasked) on the control socket."""
        try:
            data, ancdata, _, _ = self.sock.recvmsg(
                4096, _FDS_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            raise BackendDisconnectedError(f"backend connection: {err}") from err
        fds = _fds_of(ancdata)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not data:
            raise BackendDisconnectedError(f"backend {self.path} closed the connection")
        raise FrontendError(f"backend sent {len(data)} unrequested bytes")

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection, the queues' eventfds and the memory (the backend resets)."""
        if self.closed:
            return
        self.closed = True
        for fd in self.session.close():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        if self.memory is not None:
            self.memory.close()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class DeviceClient:
    """What every device client shares: it owns a :class:`VhostUserFrontend`, closes it, and
    is a context manager. Subclasses take the connected frontend as their first argument."""

    frontend: VhostUserFrontend
    #: Default seconds for :meth:`wait_for`.
    timeout: float = 10.0
    #: What :meth:`wait_for` raises when time is up.
    wait_error: type[FrontendError] = FrontendError

    def poll(self) -> None:
        """Take in what the backend completed (clients with traffic of their own override)."""

    def _polled_queues(self) -> list[FrontendQueue]:
        """The queues whose interrupts :meth:`wait_for` sleeps on."""
        return []

    def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float | None = None
    ) -> None:
        """:meth:`poll` until ``predicate()`` holds; raise :attr:`wait_error` after ``timeout``
        seconds (default :attr:`timeout`), sleeping on the queues' interrupts meanwhile."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        queues = self._polled_queues()
        while True:
            self.poll()
            if predicate():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.wait_error(f"timed out waiting for {what}")
            if self.frontend.wait(queues, min(left, 0.1)):
                for q in queues:
                    q.ack_calls()

    @classmethod
    def _open(
        cls,
        path: str,
        *,
        connect_timeout: float | None,
        protocol_features: int,
        packed: bool = False,
        **options: Any,
    ) -> Self:
        """Connect to ``path`` and build the client; the connection is closed if that fails."""
        frontend = VhostUserFrontend(
            path, timeout=connect_timeout, protocol_features=protocol_features, packed=packed
        )
        try:
            return cls(frontend, **options)  # type: ignore[call-arg]
        except BaseException:
            frontend.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (the backend resets the device) and free guest memory."""
        self.frontend.close()


__all__ = [
    "BackendDisconnectedError",
    "DeviceClient",
    "FrontendError",
    "FrontendQueue",
    "ProtocolError",
    "RequestFailedError",
    "VhostUserFrontend",
]
