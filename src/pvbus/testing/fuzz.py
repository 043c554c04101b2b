"""Coverage-guided fuzz targets (atheris/libFuzzer) for what a hostile peer controls.

``messages``: a byte stream with fds, cut into chunks, fed to a backend's MessageReader and
BackendSession driving a real virtio-blk device. Only ProtocolError may come out, and no fd
may leak.

``rings``: a descriptor table, available ring and queue parameters written into guest memory
that sits between two PROT_NONE guard pages, processed by virtio-blk and then by the split
ring's common-case loops (``SplitQueue.pop_frames``, ``pop_batch`` and ``fill_batch``, in C
where built).
Only QueueError may come out; an access outside guest memory would fault on a guard page and
crash the run.

``packed-rings``: the same for a packed virtqueue (VIRTIO 1.2 section 2.8): a descriptor ring,
the two event suppression structures, the queue size (any, up to 256) and a vring base,
processed by virtio-blk, then by the packed ring's fast lane and by a burst given back.

Run as ``pvbus fuzz TARGET --runs N`` (or ``python -m pvbus.testing.fuzz TARGET -runs=N``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Callable

from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.vhost_user.backend import BackendSession
from pvbus.vhost_user.codec import MessageReader
from pvbus.vhost_user.errors import ProtocolError, RemoteProtocolError
from pvbus.virtio.batch import BATCH_BYTES, FrameBatch
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory, MemoryRegion
from pvbus.virtio.packed import PackedQueue
from pvbus.virtio.split import SplitQueue

PAGE = mmap.PAGESIZE
GUEST_BASE = 0x10000
GUEST_SIZE = 16 * PAGE
_libc = ctypes.CDLL(None, use_errno=True)


def feed_session(
    reader: MessageReader, session: BackendSession, data: bytes, fds: list[int]
) -> None:
    """Hand ``session`` one chunk of a stream (bytes with their fds) as its socket would.

    Every complete message is handled and the fds of its reply closed (they are the sender's
    once sent). A :class:`RemoteProtocolError` propagates with its fds already closed.
    """
    try:
        reader.receive_data(data, fds)
        while (msg := reader.next_message()) is not None:
            reply = session.handle(msg)
            for fd in reply.fds if reply is not None else ():
                os.close(fd)
    except RemoteProtocolError as err:
        for fd in err.fds:
            os.close(fd)
        raise


class _Quiet:
    def ring_started(self, index: int, kick_fd: int | None) -> None:
        pass

    def ring_stopped(self, index: int) -> None:
        pass


def _image() -> str:
    fd, path = tempfile.mkstemp(prefix="pvbus-fuzz-", suffix=".img", dir="/dev/shm")
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    return path


class GuardedGuest:
    """Guest memory between two inaccessible pages: stray accesses fault, they cannot pass."""

    def __init__(self) -> None:
        self._area = mmap.mmap(-1, GUEST_SIZE + 2 * PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
        for guard in (addr, addr + PAGE + GUEST_SIZE):
            if _libc.mprotect(ctypes.c_void_p(guard), PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.view = memoryview(self._area)[PAGE : PAGE + GUEST_SIZE]
        self.mem = GuestMemory([MemoryRegion.from_buffer(GUEST_BASE, self.view)])


#: Frames the rings target copies into whatever receive chains the ring offers.
_FRAMES = FrameBatch.of([bytes([i]) * (14 + 97 * i) for i in range(12)])


class RingTarget:
    """Fuzz target ``rings``."""

    _HEAD = struct.Struct("<BBH")

    def __init__(self) -> None:
        self.guest = GuardedGuest()
        self.device = BlockDevice(BlkConfig(image=_image(), queue_size=256))
        self.device.mem = self.guest.mem
        self._into = bytearray(BATCH_BYTES)

    def __call__(self, data: bytes) -> None:
        if len(data) < self._HEAD.size:
            return
        shift, flags, avail_idx = self._HEAD.unpack_from(data)
        size = 1 << (shift % 9)
        view = self.guest.view
        view[:] = bytes(GUEST_SIZE)
        body = data[self._HEAD.size :]
        view[: len(body)] = body[:GUEST_SIZE]
        # desc table at the start, avail after it, used on the next page: all in the guest.
        queue = self.device.queues[0]
        assert isinstance(queue, SplitQueue)
        queue.reset()
        queue.size = size
        queue.desc_addr = GUEST_BASE
        queue.avail_addr = GUEST_BASE + 16 * size
        queue.used_addr = GUEST_BASE + ((16 * size + 6 + 2 * size + 4095) & ~4095)
        queue.event_idx = bool(flags & 1)
        struct.pack_into("<H", view, 16 * size + 2, avail_idx)
        base = avail_idx - (flags >> 1) % (size + 2)
        queue.set_base(base)
        with contextlib.suppress(QueueError):
            self.device.process(0)
        # The same ring through the common-case loop (C where built), as virtio-net uses it.
        queue.set_base(base)
        _, heads = queue.pop_frames(
            self.guest.mem, 1024, skip=12, min_len=26, max_len=1526, zero_prefix=2
        )
        queue.add_used_heads(self.guest.mem, heads)
        queue.set_base(base)
        batch, heads = queue.pop_batch(
            self.guest.mem, self._into, 1024, skip=12, min_len=26, max_len=1526, zero_prefix=2
        )
        queue.set_base(base)
        queue.fill_batch(self.guest.mem, _FRAMES, 0, bytes(12))
        queue.fill_batch(self.guest.mem, batch, 0, bytes(12))
        queue.unbind()


class PackedRingTarget:
    """Fuzz target ``packed-rings``: the ring from offset 0 of guest memory, the driver and
    device areas right after it, the rest (data, indirect tables) anywhere."""

    _HEAD = struct.Struct("<BBI")  # size - 1, flags (event_idx, ...), vring base

    def __init__(self) -> None:
        self.guest = GuardedGuest()
        self.device = BlockDevice(BlkConfig(image=_image(), queue_size=256))
        self.device.mem = self.guest.mem
        self.device.use_packed_rings(True)
        self._into = bytearray(BATCH_BYTES)

    def __call__(self, data: bytes) -> None:
        if len(data) < self._HEAD.size:
            return
        size_1, flags, base = self._HEAD.unpack_from(data)
        size = size_1 + 1
        view = self.guest.view
        view[:] = bytes(GUEST_SIZE)
        body = data[self._HEAD.size :]
        view[: len(body)] = body[:GUEST_SIZE]
        queue = self.device.queues[0]
        assert isinstance(queue, PackedQueue)
        mem = self.guest.mem
        for step in range(4):
            queue.reset()
            queue.size = size
            queue.desc_addr = GUEST_BASE
            queue.avail_addr = GUEST_BASE + 16 * size
            queue.used_addr = GUEST_BASE + 16 * size + 4
            queue.event_idx = bool(flags & 1)
            # Positions kept inside the ring most of the time; the rest checks validate().
            queue.set_base(base if flags & 2 else base % size | base & 0x8000_8000)
            with contextlib.suppress(QueueError):
                if step == 0:
                    self.device.process(0)
                elif step == 1:
                    _, heads = queue.pop_frames(
                        mem, 1024, skip=12, min_len=26, max_len=1526, zero_prefix=2
                    )
                    queue.add_used_heads(mem, heads)
                    queue.fill_batch(mem, _FRAMES, 0, bytes(12))
                elif step == 2:
                    batch, heads = queue.pop_batch(mem, self._into, 1024, skip=12)
                    queue.fill_batch(mem, batch, 0, bytes(12))
                else:
                    burst = queue.pop_burst(mem, 64, write=bool(flags & 4))
                    queue.unpop(len(burst))
                    queue.pending(mem)
                    queue.want_more(mem)
                    queue.needs_notification(mem)
        queue.unbind()


class MessageTarget:
    """Fuzz target ``messages``."""

    def __init__(self) -> None:
        self.device = BlockDevice(BlkConfig(image=_image(), queue_size=256))
        self.memfd = os.memfd_create("pvbus-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 1 << 20)
        self.baseline = len(os.listdir("/proc/self/fd"))

    def __call__(self, data: bytes) -> None:
        session = BackendSession(self.device, _Quiet())
        reader = MessageReader("backend")
        pos = 0
        try:
            while pos < len(data):
                cut = 1 + data[pos] % 64
                nfds = data[pos] >> 6
                chunk = data[pos + 1 : pos + 1 + cut]
                pos += 1 + cut
                feed_session(reader, session, chunk, [os.dup(self.memfd) for _ in range(nfds)])
        except ProtocolError:
            pass
        finally:
            for fd in reader.close():
                os.close(fd)
            session.close()
        now = len(os.listdir("/proc/self/fd"))
        if now != self.baseline:
            raise AssertionError(f"fd leak: {now} open, {self.baseline} before")


def _chunks(stream: list[tuple[bytes, int]]) -> bytes:
    """Encode (bytes, fd count) pieces in MessageTarget's chunk format."""
    out = bytearray()
    for data, nfds in stream:
        for i in range(0, len(data), 64):
            piece = data[i : i + 64]
            out.append((nfds if i == 0 else 0) << 6 | (len(piece) - 1))
            out += piece
    return bytes(out)


def seeds() -> dict[str, list[bytes]]:
    """Valid starting points: a full negotiation and ring set-up, and one ring of requests."""
    from pvbus.vhost_user.codec import encode
    from pvbus.vhost_user.messages import (
        U64,
        ConfigSpace,
        Empty,
        MemTable,
        Message,
        Region,
        Request,
        VringAddr,
        VringState,
    )

    def m(request: Request, payload: object = None, nfds: int = 0) -> tuple[bytes, int]:
        msg = Message(request, payload if payload is not None else Empty())  # type: ignore[arg-type]
        return encode(msg)[0], nfds

    setup = [
        m(Request.GET_FEATURES),
        m(Request.SET_OWNER),
        m(Request.SET_FEATURES, U64(1 << 32 | 1 << 29 | 1 << 30)),
        m(Request.GET_PROTOCOL_FEATURES),
        m(Request.SET_PROTOCOL_FEATURES, U64(0x1_020B)),
        m(Request.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60))),
        m(Request.SET_MEM_TABLE, MemTable((Region(0, 1 << 20, 0x7000_0000, 0),)), 1),
        m(Request.SET_VRING_NUM, VringState(0, 8)),
        m(Request.SET_VRING_ADDR, VringAddr(0, 0, 0x7000_0000, 0x7000_1000, 0x7000_0080)),
        m(Request.SET_VRING_BASE, VringState(0, 0)),
        m(Request.SET_VRING_CALL, U64(0x100)),
        m(Request.SET_VRING_KICK, U64(0x100)),
        m(Request.SET_VRING_ENABLE, VringState(0, 1)),
        m(Request.GET_VRING_BASE, VringState(0, 0)),
        m(Request.GET_STATUS),
        m(Request.RESET_DEVICE),
    ]
    ring = bytearray(struct.pack("<BBH", 3, 1, 1))
    ring += struct.pack("<QIHH", 0x10000 + 0x800, 16, 1, 1)
    ring += struct.pack("<QIHH", 0x10000 + 0x900, 512, 3, 2)
    ring += struct.pack("<QIHH", 0x10000 + 0xB00, 1, 2, 0)
    # A packed ring of 8 at base 0 (wrap counters 1): a read as a list and one as a table.
    avail = 1 << 7
    packed = bytearray(struct.pack("<BBI", 7, 1, 0x8000_8000))
    for addr, length, flags in ((0x800, 16, 1), (0x900, 512, 3), (0xB00, 1, 2)):
        packed += struct.pack("<QIHH", GUEST_BASE + addr, length, 0, flags | avail)
    packed += struct.pack("<QIHH", GUEST_BASE + 0xC00, 48, 1, 4 | avail)
    packed += bytes(16 * 4 + 8)
    packed += bytes(0xC00 - len(packed) + 6)
    for addr, length, flags in ((0x800, 16, 0), (0xA00, 512, 2), (0xB00, 1, 2)):
        packed += struct.pack("<QIHH", GUEST_BASE + addr, length, 0, flags)
    return {
        "messages": [_chunks(setup)],
        "rings": [bytes(ring)],
        "packed-rings": [bytes(packed)],
    }


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "rings": RingTarget,
    "packed-rings": PackedRingTarget,
    "messages": MessageTarget,
}


#: Started in a fresh interpreter so that pvbus is imported under atheris' coverage hooks.
LAUNCHER = """
import sys, atheris
with atheris.instrument_imports(include=["pvbus"]):
    from pvbus.testing import fuzz
fuzz.fuzz(sys.argv)
"""


def fuzz(argv: list[str]) -> None:
    """Run libFuzzer on ``argv[1]`` with the libFuzzer options that follow; never returns."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[argv[1]]()
    corpus = [a for a in argv[2:] if not a.startswith("-")]
    for directory in corpus[:1]:
        os.makedirs(directory, exist_ok=True)
        for i, seed in enumerate(seeds()[argv[1]]):
            with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
                f.write(seed)
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


def command(target: str, options: list[str]) -> list[str]:
    """The command line that fuzzes ``target`` with libFuzzer ``options``."""
    return [sys.executable, "-c", LAUNCHER, target, *options]


if __name__ == "__main__":
    os.execv(sys.executable, command(sys.argv[1] if len(sys.argv) > 1 else "", sys.argv[2:]))
