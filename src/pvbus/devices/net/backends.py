"""Host sides of a virtio-net device: where transmitted frames go and received ones come from.

A backend moves whole Ethernet frames (no virtio-net header) over one non-blocking fd that the
device watches with its reactor:

* :class:`TapBackend`: a Linux tap interface (``/dev/net/tun``, ``TUNSETIFF`` with
  ``IFF_TAP | IFF_NO_PI``), created or attached by name; needs CAP_NET_ADMIN.
* :class:`SeqpacketBackend`: a ``SOCK_SEQPACKET`` Unix socket, one frame per message; the port
  of a :mod:`pvbus switch <pvbus.devices.net.switch>` (:func:`connect_switch`).
* :class:`StreamBackend`: a stream socket in QEMU's ``-netdev stream`` framing, each frame
  preceded by its length as a 4-byte big-endian integer (what passt speaks).
* :class:`LoopbackBackend`: every transmitted frame comes back on receive (benchmarks).

A backend may also offer ``send_burst`` (:class:`BurstBackend`), which the device prefers for
frames that need no gathering; :class:`LoopbackBackend` does.

Sending never blocks the event loop: a frame the peer has no room for is dropped, as a NIC with
a full transmit queue would (:meth:`NetBackend.send` returns ``False``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from pvbus.devices.net.frames import MAX_FRAME
from pvbus.virtio.batch import BATCH_BYTES, FrameBatch

__all__ = [
    "BackendClosedError",
    "BurstBackend",
    "LoopbackBackend",
    "NetBackend",
    "SeqpacketBackend",
    "StreamBackend",
    "TapBackend",
    "connect_stream",
    "connect_switch",
]

Chunk = bytes | bytearray | memoryview

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFNAMSIZ = 16

_LEN = struct.Struct(">I")


class BackendClosedError(ConnectionError):
    """The backend's peer went away (end of file, connection reset)."""


class NetBackend(Protocol):
    """One host-side port that carries whole Ethernet frames."""

    def fileno(self) -> int:
        """The fd to watch for incoming frames."""

    def recv_into(self, buf: memoryview) -> int:
        """Read one frame into ``buf``; its length, or 0 when none is waiting.

        Frames longer than ``buf`` are dropped. Raises :class:`BackendClosedError` when the peer
        is gone.
        """

    def send(self, parts: Sequence[Chunk]) -> bool:
        """Send one frame made of ``parts``; ``False`` if it was dropped (no room)."""

    def close(self) -> None:
        """Release the fd."""


class BatchBackend(NetBackend, Protocol):
    """A backend that keeps frames as :class:`~pvbus.virtio.batch.FrameBatch` es (optional).

    The device copies a transmit burst into one batch and hands it over
    (:meth:`~pvbus.virtio.split.SplitQueue.pop_batch`), and copies waiting batches straight
    into receive buffers (:meth:`~pvbus.virtio.split.SplitQueue.fill_batch`), then takes as
    many frames as it placed: no Python object per frame either way.
    """

    def buffer(self) -> bytearray:
        """A buffer for the device to copy the next batch into (the backend recycles them)."""

    def send_batch(self, batch: FrameBatch) -> int:
        """Keep the frames of ``batch`` that fit, in order; how many (the rest are dropped).

        The backend owns the batch's buffer from now on; a batch of no frames gives it back.
        """

    def peek_batch(self) -> tuple[FrameBatch, int] | None:
        """The oldest waiting batch and the index of its first waiting frame, if any."""

    def consume(self, count: int) -> None:
        """Take the ``count`` oldest waiting frames."""


class BurstBackend(NetBackend, Protocol):
    """A backend that also takes many frames in one call (optional; the device looks for it).

    The device then hands it a whole transmit burst of one-chunk frames at once instead of
    calling :meth:`NetBackend.send` for each: the per-frame cost of a Python call is a large
    part of the data path.
    """

    def send_burst(self, frames: Sequence[Chunk]) -> int:
        """Send whole frames, one chunk each, in order; how many were sent.

        The first frame with no room and all after it are dropped. Raises
        :class:`BackendClosedError` only when the peer is gone before any was sent.
        """


def send_each(send: Callable[[Sequence[Chunk]], bool], frames: Sequence[Chunk]) -> int:
    """:meth:`BurstBackend.send_burst` from a backend's one-frame ``send``: in order, until
    ``send`` refuses a frame (it and the rest are dropped). A peer gone after some were sent
    is left for the next call to report, so the count stays right."""
    sent = 0
    for frame in frames:
        try:
            if not send((frame,)):
                break
        except BackendClosedError:
            if sent:
                break
            raise
        sent += 1
    return sent


class TapBackend:
    """A tap interface: ``read``/``write`` of one frame each (``IFF_NO_PI``).

    With ``vnet_hdr`` the tap is opened with ``IFF_VNET_HDR`` and every frame carries a
    10-byte ``virtio_net_hdr`` in front; this backend writes a zero one (no offloads) and
    strips the one it reads, so it behaves the same either way.
    """

    def __init__(self, name: str, *, vnet_hdr: bool = False) -> None:
        encoded = name.encode()
        if not encoded or len(encoded) >= _IFNAMSIZ or b"/" in encoded:
            raise ValueError(f"bad tap interface name {name!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise ValueError(f"cannot open /dev/net/tun: {err.strerror}") from err
        flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", encoded, flags))
        except OSError as err:
            os.close(fd)
            raise ValueError(f"cannot attach tap {name}: {err.strerror}") from err
        self.name = name
        self.fd = fd
        self.hdr_len = 10 if vnet_hdr else 0
        self._hdr = bytes(self.hdr_len)
        self._scratch = bytearray(self.hdr_len)

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, buf: memoryview) -> int:
        try:
            if self.hdr_len:
                n = os.readv(self.fd, [self._scratch, buf]) - self.hdr_len
            else:
                n = os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0
        except OSError as err:
            raise BackendClosedError(f"tap {self.name}: {err.strerror}") from err
        return max(n, 0)

    def send(self, parts: Sequence[Chunk]) -> bool:
        try:
            if self.hdr_len:
                os.writev(self.fd, [self._hdr, *parts])
            else:
                os.writev(self.fd, parts)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EIO, errno.EINVAL, errno.ENOBUFS):
                return False  # interface down, or a frame the tap refuses
            raise BackendClosedError(f"tap {self.name}: {err.strerror}") from err
        return True

    #: Frames are written before ``send_burst`` returns: views of guest memory will do.
    def send_burst(self, frames: Sequence[Chunk]) -> int:
        """One write per frame, in order, until the tap refuses one (the rest are dropped)."""
        return send_each(self.send, frames)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SeqpacketBackend:
    """A connected ``SOCK_SEQPACKET`` (or ``SOCK_DGRAM``) socket: one frame per message."""

    def __init__(self, sock: socket.socket, name: str = "seqpacket") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def recv_into(self, buf: memoryview) -> int:
        try:
            n, _, flags, _ = self.sock.recvmsg_into([buf])
        except BlockingIOError:
            return 0
        except OSError as err:
            raise BackendClosedError(f"{self.name}: {err.strerror}") from err
        if n == 0 and not flags & socket.MSG_TRUNC:
            # A zero-length message is indistinguishable from end of file on SEQPACKET.
            raise BackendClosedError(f"{self.name}: peer closed")
        if flags & socket.MSG_TRUNC:
            return 0
        return n

    def send(self, parts: Sequence[Chunk]) -> bool:
        try:
            self.sock.sendmsg(parts)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
            raise BackendClosedError(f"{self.name}: {err.strerror}") from err
        return True

    #: Frames are sent before ``send_burst`` returns: views of guest memory will do.
    def send_burst(self, frames: Sequence[Chunk]) -> int:
        """One message per frame, in order, until the socket is full (the rest are dropped)."""
        return send_each(self.send, frames)

    def close(self) -> None:
        self.sock.close()


def connect_switch(path: str) -> SeqpacketBackend:
    """A port of the ``pvbus switch`` listening at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot connect to switch {path}: {err.strerror or err}") from err
    return SeqpacketBackend(sock, f"switch {path}")


class StreamBackend:
    """A stream socket with QEMU ``-netdev stream`` framing (4-byte big-endian length).

    Reads are buffered: one ``recv`` may bring many frames. A frame that does not fit in the
    socket's send buffer at all is dropped; one that fits partly is finished with a short
    blocking wait, since the framing would be lost otherwise.
    """

    #: Longest a partial frame may take to finish sending before the peer is given up on.
    SEND_TIMEOUT = 2.0

    def __init__(self, sock: socket.socket, name: str = "stream") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._fd = sock.fileno()
        self._buf = bytearray(256 * 1024)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def fileno(self) -> int:
        return self._fd

    def _fill(self) -> bool:
        """Read more bytes; ``False`` if none are waiting."""
        if self._start:
            size = self._end - self._start
            self._buf[:size] = self._view[self._start : self._end]
            self._start, self._end = 0, size
        if self._end == len(self._buf):
            return False
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except BlockingIOError:
            return False
        except OSError as err:
            raise BackendClosedError(f"{self.name}: {err.strerror}") from err
        if n == 0:
            raise BackendClosedError(f"{self.name}: peer closed")
        self._end += n
        return True

    def recv_into(self, buf: memoryview) -> int:
        while True:
            avail = self._end - self._start
            if avail >= 4:
                length: int = _LEN.unpack_from(self._buf, self._start)[0]
                if length > MAX_FRAME:
                    raise BackendClosedError(f"{self.name}: frame of {length} bytes; bad framing")
                if avail >= 4 + length:
                    begin = self._start + 4
                    self._start = begin + length
                    if length > len(buf):
                        continue
                    buf[:length] = self._view[begin : begin + length]
                    return length
            if not self._fill():
                return 0

    def send(self, parts: Sequence[Chunk]) -> bool:
        total = sum(len(p) for p in parts)
        chunks: list[Chunk] = [_LEN.pack(total), *parts]
        try:
            sent = self.sock.sendmsg(chunks)
        except BlockingIOError:
            return False
        except OSError as err:
            raise BackendClosedError(f"{self.name}: {err.strerror}") from err
        if sent < total + 4:
            self._finish(b"".join(bytes(c) for c in chunks)[sent:])
        return True

    def _finish(self, rest: bytes) -> None:
        view = memoryview(rest)
        while view:
            _, writable, _ = select.select([], [self.sock], [], self.SEND_TIMEOUT)
            if not writable:
                raise BackendClosedError(f"{self.name}: peer stopped reading mid-frame")
            try:
                sent: int = self.sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                continue
            except OSError as err:
                raise BackendClosedError(f"{self.name}: {err.strerror}") from err

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_stream(path: str) -> StreamBackend:
    """Connect to a ``-netdev stream`` peer (passt, QEMU) listening on Unix socket ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot connect to {path}: {err.strerror or err}") from err
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return StreamBackend(sock, f"stream {path}")


class LoopbackBackend:
    """Reflects every frame sent back to the device, as a cable from the port to itself.

    Frames wait in a bounded queue behind an eventfd the device watches; when the queue is
    full (the driver does not receive), new frames are dropped. They wait as
    :class:`~pvbus.virtio.batch.FrameBatch` es, a transmit burst each, so the device moves
    them in both directions with no Python object per frame (:class:`BatchBackend`).
    """

    #: Buffers of taken batches kept for reuse (a fresh one is zeroed pages to fault in).
    POOL = 128

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._batches: deque[FrameBatch] = deque()
        self._free: list[bytearray] = []
        #: Frames of the first batch already taken.
        self._pos = 0
        self._waiting = 0
        self._armed = False

    def fileno(self) -> int:
        return self.fd

    def __len__(self) -> int:
        """Frames waiting."""
        return self._waiting

    def recv_into(self, buf: memoryview) -> int:
        if not self._waiting:
            if self._armed:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.fd)
                self._armed = False
            return 0
        frame = self._batches[0].frame(self._pos)
        self.consume(1)
        n = len(frame)
        if n > len(buf):
            return 0
        buf[:n] = frame
        return n

    def send(self, parts: Sequence[Chunk]) -> bool:
        return self.send_batch(FrameBatch.of([b"".join(parts)])) == 1

    def send_burst(self, frames: Sequence[Chunk]) -> int:
        """Queue copies of the frames that fit, in order; the others are dropped uncopied."""
        room = self.limit - self._waiting
        if room <= 0 or not frames:
            return 0
        return self.send_batch(FrameBatch.of(frames[:room]))

    def buffer(self) -> bytearray:
        """A buffer of :data:`~pvbus.virtio.batch.BATCH_BYTES` to copy a batch into."""
        return self._free.pop() if self._free else bytearray(BATCH_BYTES)

    def _recycle(self, batch: FrameBatch) -> None:
        data = batch.data
        if type(data) is bytearray and len(data) == BATCH_BYTES and len(self._free) < self.POOL:
            self._free.append(data)

    def send_batch(self, batch: FrameBatch) -> int:
        """Queue the frames of ``batch`` that fit, in order; the others are dropped."""
        room = self.limit - self._waiting
        if room <= 0 or not len(batch):
            self._recycle(batch)
            return 0
        if len(batch) > room:
            batch = batch.head(room)
        self._batches.append(batch)
        self._waiting += len(batch)
        if not self._armed:
            self._armed = True
            os.eventfd_write(self.fd, 1)
        return len(batch)

    def peek_batch(self) -> tuple[FrameBatch, int] | None:
        """The oldest waiting batch and the index of its first frame not yet taken."""
        return (self._batches[0], self._pos) if self._waiting else None

    def waiting(self) -> list[bytes]:
        """Copies of the waiting frames, oldest first (to look at, not on the data path)."""
        out: list[bytes] = []
        start = self._pos
        for batch in self._batches:
            out += batch.frames(start)
            start = 0
        return out

    def consume(self, count: int) -> None:
        """Take the ``count`` oldest waiting frames (the device placed them)."""
        count = min(count, self._waiting)
        self._waiting -= count
        batches = self._batches
        pos = self._pos + count
        while batches and pos >= len(batches[0]):
            batch = batches.popleft()
            pos -= len(batch)
            self._recycle(batch)
        self._pos = pos

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
