"""virtio-blk (VIRTIO 1.2 section 5.2) over a raw image file or a block device.

Data moves with ``preadv``/``pwritev`` straight between the backing file and views of guest
memory: no intermediate copy. Every request is answered with a status byte; only a chain with
no writable byte to put a status in is a ring error (the queue then needs a reset).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass
from queue import SimpleQueue
from time import perf_counter_ns

from pvbus.devices.base import COMMON_FEATURES, LATENCY_BUCKETS, QueueStats, VirtioDevice
from pvbus.virtio.blk import (
    F_BLK_SIZE,
    F_CONFIG_WCE,
    F_DISCARD,
    F_FLUSH,
    F_MQ,
    F_RO,
    F_SEG_MAX,
    F_SIZE_MAX,
    F_TOPOLOGY,
    F_WRITE_ZEROES,
    HEADER,
    ID_BYTES,
    SECTOR,
    SEGMENT,
    WRITE_ZEROES_UNMAP,
    RequestType,
    Status,
)
from pvbus.virtio.buffers import gather, skip
from pvbus.virtio.constants import DeviceId, bit
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import Buffer, DescriptorChain

log = logging.getLogger(__name__)

# Plain ints for the hot path (IntEnum members cost an attribute lookup and a comparison).
T_IN = int(RequestType.IN)
T_OUT = int(RequestType.OUT)
T_FLUSH = int(RequestType.FLUSH)
T_GET_ID = int(RequestType.GET_ID)
T_DISCARD = int(RequestType.DISCARD)
T_WRITE_ZEROES = int(RequestType.WRITE_ZEROES)
S_OK = int(Status.OK)
S_IOERR = int(Status.IOERR)
S_UNSUPP = int(Status.UNSUPP)

_HEADER = HEADER
_header_unpack = _HEADER.unpack_from
_SEGMENT = SEGMENT
_CONFIG = struct.Struct("<QII4xIBBHIBxHIIIIIB3x")
#: Segments in one DISCARD or WRITE_ZEROES request (config max_discard_seg and
#: max_write_zeroes_seg).
MAX_DWZ_SEGMENTS = 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


#: I/O threads of a device unless configured otherwise.
DEFAULT_IO_THREADS = 2


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """Validated configuration of one virtio-blk device."""

    image: str
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 1024
    serial: str = "pvbus"
    logical_block_size: int = SECTOR
    discard: bool = True
    write_zeroes: bool = True
    #: Threads that carry out large reads and writes while the event loop goes on (0: none,
    #: everything is done inline).
    io_threads: int = DEFAULT_IO_THREADS

    def __post_init__(self) -> None:
        if not 0 <= self.io_threads <= 64:
            raise ValueError(f"io-threads {self.io_threads} is not in 0..64")
        if not 1 <= self.num_queues <= 64:
            raise ValueError(f"num-queues {self.num_queues} is not in 1..64")
        qs = self.queue_size
        if qs < 4 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two in 4..32768")
        if len(self.serial.encode()) > ID_BYTES:
            raise ValueError(f"serial {self.serial!r} is longer than {ID_BYTES} bytes")
        lbs = self.logical_block_size
        if lbs < SECTOR or lbs > 65536 or lbs & (lbs - 1):
            raise ValueError(f"logical block size {lbs} is not a power of two >= 512")


def open_image(path: str, read_only: bool) -> tuple[int, int, bool]:
    """Open a raw image or block device; return (fd, size in bytes, is a block device)."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as err:
        raise ValueError(f"cannot open image {path}: {err.strerror}") from err
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(8)
        fcntl.ioctl(fd, _BLKGETSIZE64, buf)
        size = int.from_bytes(buf, "little")
        is_blk = True
    elif stat.S_ISREG(st.st_mode):
        size = st.st_size
        is_blk = False
    else:
        os.close(fd)
        raise ValueError(f"image {path} is neither a regular file nor a block device")
    if size == 0 or size % SECTOR:
        os.close(fd)
        raise ValueError(f"image {path} is {size} bytes, not a non-zero multiple of {SECTOR}")
    return fd, size, is_blk


class BlockDevice(VirtioDevice):
    """A virtio-blk device model."""

    device_id = DeviceId.BLOCK
    name = "blk"

    def __init__(self, config: BlkConfig) -> None:
        super().__init__(config.num_queues, config.queue_size)
        self.config = config
        self.fd, self.size, self.is_block_device = open_image(config.image, config.read_only)
        self.capacity = self.size // SECTOR
        self.seg_max = min(config.queue_size - 2, 1022)
        self.size_max = 1 << 20
        self.serial = config.serial.encode().ljust(ID_BYTES, b"\0")
        self.max_discard_sectors = (1 << 30) // SECTOR
        self.writeback = 1
        self._zeroes = bytes(1 << 16)
        # Plain threads fed through a SimpleQueue (no Futures: nothing waits on a request's
        # result, so the executor's per-request bookkeeping would be pure overhead).
        self._threads: list[threading.Thread] = []
        self._jobs: SimpleQueue[tuple[int, int, _PlainIO] | None] = SimpleQueue()
        # Large requests complete on I/O threads: the lock guards each queue's used ring and
        # notification state against the event-loop thread; the condition signals when a
        # queue has no I/O left in flight (a queue stops, or the device resets, only then).
        self._lock = threading.Lock()
        self._io_idle = threading.Condition(self._lock)
        self._io_pending = [0] * config.num_queues
        self._io_unsignalled = [0] * config.num_queues
        self._io_threads = config.io_threads
        self._index = 0
        #: Counters of the queue being processed.
        self._stats = self.queue_stats[0]

    def close(self) -> None:
        """Stop the I/O threads and close the backing file."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- features and config (sections 5.2.3, 5.2.4) -----------------------------------------

    def device_features(self) -> int:
        features = (
            COMMON_FEATURES
            | bit(F_SIZE_MAX)
            | bit(F_SEG_MAX)
            | bit(F_BLK_SIZE)
            | bit(F_FLUSH)
            | bit(F_TOPOLOGY)
            | bit(F_MQ)
            | bit(F_CONFIG_WCE)
        )
        if self.config.read_only:
            features |= bit(F_RO)
        else:
            if self.config.discard:
                features |= bit(F_DISCARD)
            if self.config.write_zeroes:
                features |= bit(F_WRITE_ZEROES)
        return features

    def read_config(self) -> bytes:
        lbs = self.config.logical_block_size
        return _CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            lbs,
            0,  # physical_block_exp
            0,  # alignment_offset
            lbs // SECTOR,  # min_io_size, in logical blocks
            0,  # opt_io_size
            self.writeback,
            self.num_queues,
            self.max_discard_sectors,
            MAX_DWZ_SEGMENTS,  # max_discard_seg
            lbs // SECTOR,  # discard_sector_alignment
            self.max_discard_sectors,  # max_write_zeroes_sectors
            MAX_DWZ_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, data: bytes) -> None:
        # Only `writeback` (offset 32) is writable, with VIRTIO_BLK_F_CONFIG_WCE (5.2.5).
        if offset <= 32 < offset + len(data):
            self.writeback = 1 if data[32 - offset] else 0

    def reset_device(self) -> None:
        self.writeback = 1

    # -- requests (section 5.2.6) ------------------------------------------------------------

    def process(self, index: int) -> None:
        """Drain queue ``index``: :meth:`VirtioDevice.drain` and the request loop in one frame.

        This is the per-kick hot path, so it is written out flat. Kicks stay suppressed while
        chains keep coming (section 2.7.10); each pass publishes its completions with one
        used-index write before kicks are re-armed, and the driver is signalled once, after
        the last pass. Plain reads and writes are recognised by :meth:`_plain_io` and done
        here; large ones go to the I/O threads when a transport runs the device
        (``preadv``/``pwritev`` release the GIL, so copies overlap each other and the ring
        processing) and complete from there. Anything else takes the general path.
        """
        queue = self.queues[index]
        mem = self.mem
        stats = self._stats = self.queue_stats[index]
        self._index = index
        pop = queue.pop
        plain_io = self._plain_io
        execute = self._execute
        offload = self.config.io_threads > 0 and self.reactor is not None
        large_min = LARGE_IO if offload else 1 << 62
        fd = self.fd
        writeback = self.writeback
        preadv, pwritev = os.preadv, os.pwritev
        # With EVENT_IDX nothing needs turning off: the driver kicks only when its available
        # index passes avail_event, which stays put until set_notification re-arms it.
        suppress = not queue.event_idx
        done = 0
        start = perf_counter_ns()
        while True:
            if suppress:
                queue.set_notification(mem, False)
            used: list[tuple[int, int]] = []
            append = used.append
            try:
                while (chain := pop(mem)) is not None:
                    io = plain_io(chain, mem)
                    if io is None:
                        append((chain.head, execute(chain, mem)))
                        continue
                    is_write, views, total, offset, status_view = io
                    if total >= large_min:
                        self._offload(index, chain.head, io)
                        continue
                    try:
                        if not total:
                            got = 0
                        elif is_write:
                            got = pwritev(fd, views, offset)
                        else:
                            got = preadv(fd, views, offset)
                    except OSError:
                        got = -1
                    if got == total and (writeback or not is_write):
                        status_view[0] = S_OK
                        stats.bytes += total
                        append((chain.head, 1 if is_write else total + 1))
                    else:  # a short transfer, an error, or a write-through write
                        append((chain.head, self._plain_done(io, got, stats)))
            finally:
                if used:
                    if not self._threads:  # no I/O thread exists to race with
                        queue.add_used_many(mem, used)
                    else:
                        with self._lock:
                            queue.add_used_many(mem, used)
                    done += len(used)
            if not queue.set_notification(mem, True):
                break
        if not done:
            return
        stats.requests += done
        bucket = ((perf_counter_ns() - start) >> 10).bit_length()
        stats.latency[bucket if bucket < LATENCY_BUCKETS else LATENCY_BUCKETS - 1] += done
        # signal(), inlined. The decision is taken under the lock when I/O threads may
        # complete requests of the queue; the eventfd write (which may wake the driver and
        # preempt us) is not.
        if not self._threads:
            notify = queue.needs_notification(mem)
        else:
            with self._lock:
                notify = queue.needs_notification(mem)
        if notify:
            self.interrupt(index)

    def signal(self, index: int) -> None:
        # The decision is taken under the lock when I/O threads may complete requests of the
        # queue; the eventfd write (which may wake the driver and preempt us) is not.
        queue = self.queues[index]
        if not self._threads:
            notify = queue.needs_notification(self.mem)
        else:
            with self._lock:
                notify = queue.needs_notification(self.mem)
        if notify:
            self.interrupt(index)

    def _offload(self, index: int, head: int, io: _PlainIO) -> None:
        if not self._threads:
            for i in range(self.config.io_threads):
                thread = threading.Thread(
                    target=self._io_worker, name=f"pvbus-blk-io-{i}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        with self._lock:
            self._io_pending[index] += 1
        self._jobs.put((index, head, io))

    def _io_worker(self) -> None:
        """An I/O thread: carry out offloaded requests until :meth:`close` sends ``None``."""
        get = self._jobs.get
        complete = self._complete_offloaded
        while (job := get()) is not None:
            complete(*job)

    def _complete_offloaded(self, index: int, head: int, io: _PlainIO) -> None:
        """On an I/O thread: do the copy, then publish the used entry and signal the driver."""
        got = _plain_call(self.fd, io)
        with self._lock:
            try:
                queue = self.queues[index]
                stats = self.queue_stats[index]
                mem = self.mem
                queue.add_used(mem, head, self._plain_done(io, got, stats))
                stats.requests += 1
                # Coalesce, without starving the threads: signal once fewer requests of the
                # queue are left in flight than there are threads (one has nothing queued, so
                # the driver should refill now), or after COALESCE_IO completions while more
                # keep coming. Signalling only at the last one drained the pipeline each time.
                unsignalled = self._io_unsignalled[index] + 1
                if self._io_pending[index] <= self._io_threads or unsignalled >= COALESCE_IO:
                    unsignalled = 0
                    # Under the lock: once the queue stops (_wait_io), its call fd may close.
                    if queue.needs_notification(mem):
                        self.interrupt(index)
                self._io_unsignalled[index] = unsignalled
            except Exception:  # an I/O thread must not die silently
                log.exception("completing request %d of queue %d", head, index)
            finally:
                self._io_pending[index] -= 1
                if not self._io_pending[index]:
                    self._io_idle.notify_all()

    def _wait_io(self, index: int | None = None) -> None:
        """Block until queue ``index`` (or every queue) has no offloaded I/O in flight."""
        with self._io_idle:
            while self._io_pending[index] if index is not None else any(self._io_pending):
                self._io_idle.wait()

    def queue_stopped(self, index: int) -> None:
        self._wait_io(index)
        super().queue_stopped(index)

    def reset(self) -> None:
        self._wait_io()
        super().reset()

    def _plain_io(self, chain: DescriptorChain, mem: GuestMemory) -> _PlainIO | None:
        """The buffers of a plain read or write (header, data, status), or None for others.

        Anything unusual (another type, a bad range or address, a read-only device) is left to
        :meth:`execute`'s general path, which answers it with the right status.
        """
        readable = chain.readable
        writable = chain.writable
        if (
            not readable
            or not writable
            or readable[0][1] != 16
            or writable[-1][1] != 1
            or self.fd < 0
        ):
            return None
        translate = mem.translate
        try:
            rtype, _, sector = _header_unpack(translate(readable[0][0], 16))
            status_view = translate(writable[-1][0], 1)
            if rtype == T_IN and len(readable) == 1:
                bufs = writable[:-1]
                is_write = False
            elif rtype == T_OUT and len(writable) == 1 and not self.config.read_only:
                bufs = readable[1:]
                is_write = True
            else:
                return None
            views = []
            total = 0
            for addr, length in bufs:
                views.append(translate(addr, length))
                total += length
        except GuestMemoryError:
            return None
        capacity = self.capacity
        if total % SECTOR or sector > capacity or total > (capacity - sector) * SECTOR:
            return None
        return is_write, views, total, sector * SECTOR, status_view

    def _plain_done(self, io: _PlainIO, got: int, stats: QueueStats) -> int:
        """Write the status of a plain request that moved ``got`` bytes; its used length."""
        is_write, _, total, _, status_view = io
        if got != total:
            status_view[0] = S_IOERR
            stats.errors += 1
            return 1
        if is_write and not self.writeback:
            try:
                os.fdatasync(self.fd)
            except OSError:
                status_view[0] = S_IOERR
                stats.errors += 1
                return 1
        status_view[0] = S_OK
        stats.bytes += total
        return 1 if is_write else total + 1

    def execute(self, chain: DescriptorChain, mem: GuestMemory) -> int:
        """Carry out one request; write its status; return the bytes written to the guest."""
        io = self._plain_io(chain, mem)
        if io is not None:
            return self._plain_done(io, _plain_call(self.fd, io), self._stats)
        return self._execute(chain, mem)

    def _execute(self, chain: DescriptorChain, mem: GuestMemory) -> int:
        writable = chain.writable
        if not writable or writable[-1][1] == 0:
            raise QueueError(f"request {chain.head} has no writable status byte")
        saddr, slen = writable[-1]
        try:
            status_view = mem.translate(saddr + slen - 1, 1)
        except GuestMemoryError as err:
            raise QueueError(f"request {chain.head}: status byte: {err}") from err
        data_out = writable[:-1]
        if slen > 1:
            data_out.append((saddr, slen - 1))
        try:
            status, written = self._dispatch(chain.readable, data_out, mem)
        except GuestMemoryError:
            status, written = S_IOERR, 0
        except OSError:
            status, written = S_IOERR, 0
        status_view[0] = status
        if status:
            self._stats.errors += 1
        return written + 1

    def _dispatch(
        self, readable: list[Buffer], writable: list[Buffer], mem: GuestMemory
    ) -> tuple[int, int]:
        if readable and readable[0][1] == _HEADER.size:
            rtype, _, sector = _HEADER.unpack_from(mem.translate(*readable[0]))
            data_in = readable[1:]
        else:
            head = gather(readable, _HEADER.size, mem)
            if head is None:
                return S_IOERR, 0
            rtype, _, sector = _HEADER.unpack(head)
            data_in = skip(readable, _HEADER.size)
        if rtype == T_IN:
            return self._read(sector, writable, mem)
        if rtype == T_OUT:
            return self._write(sector, data_in, mem), 0
        if rtype == T_FLUSH:
            if self.fd >= 0:
                os.fdatasync(self.fd)
            return S_OK, 0
        if rtype == T_GET_ID:
            return self._get_id(writable, mem)
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._zero_or_discard(rtype, data_in, mem), 0
        return S_UNSUPP, 0

    def _check_range(self, sector: int, length: int) -> bool:
        return (
            length % SECTOR == 0
            and sector <= self.capacity
            and length <= (self.capacity - sector) * SECTOR
        )

    def _read(self, sector: int, bufs: list[Buffer], mem: GuestMemory) -> tuple[int, int]:
        total = 0
        views = []
        for addr, length in bufs:
            views.append(mem.translate(addr, length))
            total += length
        if not self._check_range(sector, total):
            return S_IOERR, 0
        if total and os.preadv(self.fd, views, sector * SECTOR) != total:
            return S_IOERR, 0
        self._stats.bytes += total
        return S_OK, total

    def _write(self, sector: int, bufs: list[Buffer], mem: GuestMemory) -> int:
        if self.config.read_only:
            return S_IOERR
        total = 0
        views = []
        for addr, length in bufs:
            views.append(mem.translate(addr, length))
            total += length
        if not self._check_range(sector, total):
            return S_IOERR
        if total and os.pwritev(self.fd, views, sector * SECTOR) != total:
            return S_IOERR
        self._stats.bytes += total
        if not self.writeback and self.fd >= 0:
            os.fdatasync(self.fd)
        return S_OK

    def _get_id(self, bufs: list[Buffer], mem: GuestMemory) -> tuple[int, int]:
        room = sum(n for _, n in bufs)
        if room < ID_BYTES:
            return S_IOERR, 0
        done = 0
        for addr, length in bufs:
            part = self.serial[done : done + length]
            mem.translate(addr, len(part))[:] = part
            done += len(part)
            if done == ID_BYTES:
                break
        return S_OK, ID_BYTES

    def _zero_or_discard(self, rtype: int, bufs: list[Buffer], mem: GuestMemory) -> int:
        if self.config.read_only:
            return S_IOERR
        if rtype == T_DISCARD and not self.config.discard:
            return S_UNSUPP
        if rtype == T_WRITE_ZEROES and not self.config.write_zeroes:
            return S_UNSUPP
        # As many segments as the config space allows (max_discard_seg, max_write_zeroes_seg
        # are 1), checked before anything is copied: a request must not make us gather or
        # loop over whatever the guest's buffers hold.
        length = sum(n for _, n in bufs)
        if length != _SEGMENT.size * MAX_DWZ_SEGMENTS:
            return S_IOERR
        data = gather(bufs, length, mem)
        if data is None:
            return S_IOERR
        for sector, count, flags in _SEGMENT.iter_unpack(data):
            if flags & ~WRITE_ZEROES_UNMAP or (rtype == T_DISCARD and flags):
                return S_UNSUPP
            if count > self.max_discard_sectors or not self._check_range(sector, count * SECTOR):
                return S_IOERR
            if rtype == T_DISCARD:
                self._discard(sector * SECTOR, count * SECTOR)
            else:
                self._write_zeroes(sector * SECTOR, count * SECTOR, bool(flags))
        return S_OK

    def _discard(self, offset: int, length: int) -> None:
        if self.is_block_device:
            fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
            return
        try:
            fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            # Discard is a hint (5.2.6.2): a file system without holes just keeps the data.

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not self.is_block_device:
            mode = (
                _FALLOC_FL_PUNCH_HOLE if unmap else _FALLOC_FL_ZERO_RANGE
            ) | _FALLOC_FL_KEEP_SIZE
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        end = offset + length
        zeroes = self._zeroes
        while offset < end:
            offset += os.pwrite(self.fd, zeroes[: min(len(zeroes), end - offset)], offset)


#: (is a write, data views, total bytes, byte offset, status byte view)
_PlainIO = tuple[bool, list[memoryview], int, int, memoryview]
#: Plain reads and writes at least this large go to the I/O threads.
LARGE_IO = 128 << 10
#: Most offloaded completions left unsignalled while others are still in flight.
COALESCE_IO = 4


def _plain_call(fd: int, io: _PlainIO) -> int:
    """preadv/pwritev of a plain request; -1 if the system call failed."""
    is_write, views, total, offset, _ = io
    if not total:  # a zero-length request moves nothing
        return 0
    try:
        return os.pwritev(fd, views, offset) if is_write else os.preadv(fd, views, offset)
    except OSError:
        return -1
