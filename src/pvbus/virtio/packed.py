"""The packed virtqueue, device side (VIRTIO 1.2 section 2.8).

:class:`PackedQueue` offers what :class:`~pvbus.virtio.split.SplitQueue` offers, with the same
results, so a device works on either (:class:`~pvbus.virtio.queue.Virtqueue`). One descriptor
ring is written by both sides: the driver makes descriptors available in ring order, the device
overwrites them with used descriptors in the order it completes buffers (2.8). Each side keeps a
position and a wrap counter that flips at the end of the ring (2.8.1); a descriptor is available
when its AVAIL flag matches the driver's wrap counter and USED does not, used when both match
the device's. A chain is a run of consecutive descriptors linked by NEXT, its buffer id in the
last one (2.8.6); it is returned with one used descriptor, after which the used position skips
as many descriptors as the chain had, so the queue remembers each id's count. A chain can
instead be one descriptor pointing to an indirect table (2.8.7). ``head`` of a chain is its
buffer id.

Ring addresses are those vhost-user's SET_VRING_ADDR carries for packed rings (QEMU passes the
areas the transport knows as desc, driver and device): ``desc_addr`` is the descriptor ring,
``avail_addr`` the Driver Event Suppression structure (driver area, read here) and
``used_addr`` the Device Event Suppression structure (device area, written here); 2.8.10.

As for split rings, queue state is kept apart from guest memory, chains are walked eagerly
into (address, length) lists, device-readable first, anything malformed raises
:class:`QueueError`, and buffer addresses are left for the device to translate. Reads follow
the driver's order: a descriptor's flags are loaded before its other fields (the driver stores
them last); used descriptors are written id and length first, flags last, and a batch's first
descriptor after all the others, so the driver sees the batch at once (2.8.9).
"""

from __future__ import annotations

import array
import struct

from pvbus.virtio.barrier import full_barrier
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import (
    MAX_PACKED_QUEUE_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.inflight import PackedInflight
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import MAX_INDIRECT, Buffer, DescriptorChain, Popped

try:
    from pvbus.virtio import _fastring
except ImportError:  # not built: the Python loops below do the same
    _fastring = None  # type: ignore[assignment]

__all__ = ["PackedQueue", "decode_base", "encode_base"]

_DESC = struct.Struct("<QIHH")  # addr, len, id, flags (2.8.13)
_LEN_ID = struct.Struct("<IH")  # len, id of a used descriptor; its flags are stored apart
_desc_unpack = _DESC.unpack_from
_len_id_pack = _LEN_ID.pack_into

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_CHAINED = _NEXT | _INDIRECT
#: The AVAIL and USED bits: ``flags & _WRAP_BITS`` is ``_F_AVAIL`` for an available descriptor
#: of a lap with wrap counter 1, ``_F_USED`` for one of a lap with wrap counter 0; XOR with
#: ``_WRAP_BITS`` goes from one lap's pattern to the next.
_F_AVAIL = VIRTQ_DESC_F_AVAIL
_WRAP_BITS = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


def encode_base(avail_pos: int, avail_wrap: int, used_pos: int, used_wrap: int) -> int:
    """The vring base of SET/GET_VRING_BASE for a packed ring (vhost-user.rst "Vring
    descriptor indices for packed virtqueues", QEMU's virtio_queue_packed_get_last_avail_idx):
    bits 0-14 the next available position, bit 15 its wrap counter, bits 16-30 the next used
    position, bit 31 its wrap counter."""
    return avail_pos | avail_wrap << 15 | (used_pos | used_wrap << 15) << 16


def decode_base(base: int) -> tuple[int, int, int, int]:
    """(avail position, avail wrap, used position, used wrap) of a packed vring base.

    A frontend that sends only the low 16 bits (the used half all zero) means the used side
    stands where the available side does, as DPDK reads it.
    """
    avail_pos, avail_wrap = base & 0x7FFF, (base >> 15) & 1
    used = (base >> 16) & 0xFFFF
    if not used:
        return avail_pos, avail_wrap, avail_pos, avail_wrap
    return avail_pos, avail_wrap, used & 0x7FFF, used >> 15


class PackedQueue:
    """Device-side state of one packed virtqueue.

    Set ``size`` and the three guest-physical addresses, then ``ready = True``. The positions
    and wrap counters start at 0 and 1 (2.8.1) and are what SET_VRING_BASE sets and
    :meth:`vring_base` returns. ``next_avail`` and ``next_used`` count chains (free-running,
    16 bits) as a split ring's indices do.
    """

    __slots__ = (
        "_avail_bits",
        "_dev16",
        "_drv16",
        "_mem",
        "_ndesc",
        "_resubmit",
        "_ring",
        "_ring16",
        "avail_addr",
        "avail_pos",
        "desc_addr",
        "event_idx",
        "inflight",
        "max_size",
        "next_avail",
        "next_used",
        "ready",
        "signalled_used",
        "signalled_valid",
        "size",
        "used_addr",
        "used_count",
        "used_pos",
        "used_wrap",
    )

    def __init__(self, max_size: int = 1024) -> None:
        self.max_size = max_size
        self.size = max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.event_idx = False
        self.avail_pos = 0
        #: The flag bits of an available descriptor in the lap ``avail_pos`` is in: the
        #: driver's wrap counter, as the device sees it (2.8.1).
        self._avail_bits = _F_AVAIL
        self.used_pos = 0
        self.used_wrap = 1
        self.next_avail = 0
        self.next_used = 0
        #: Descriptors used so far (free-running, 16 bits), for used-buffer notifications.
        self.used_count = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self._mem: GuestMemory | None = None
        self._ring = memoryview(b"")
        self._ring16 = memoryview(b"").cast("H")
        self._drv16 = memoryview(b"").cast("H")
        self._dev16 = memoryview(b"").cast("H")
        #: Descriptor count of each buffer id in flight whose chain has more than one.
        self._ndesc: dict[int, int] = {}
        #: Inflight tracking (vhost-user INFLIGHT_SHMFD), when the frontend shares a region.
        self.inflight: PackedInflight | None = None
        self._resubmit: list[DescriptorChain] = []

    @property
    def avail_wrap(self) -> int:
        """The device's copy of the driver's wrap counter at ``avail_pos``."""
        return 1 if self._avail_bits == _F_AVAIL else 0

    def reset(self) -> None:
        """Back to the state after device reset (section 2.1.2)."""
        self.__init__(self.max_size)  # type: ignore[misc]

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: positions and wrap counters (:func:`decode_base`)."""
        avail_pos, avail_wrap, self.used_pos, self.used_wrap = decode_base(base)
        self.avail_pos = avail_pos
        self._avail_bits = _F_AVAIL if avail_wrap else VIRTQ_DESC_F_USED
        self.signalled_valid = False

    def vring_base(self) -> int:
        """GET_VRING_BASE: where both sides stand (:func:`encode_base`)."""
        return encode_base(self.avail_pos, self.avail_wrap, self.used_pos, self.used_wrap)

    # -- ring views -------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the size (1 to 2**15, any value: section 2.8) and the positions."""
        size = self.size
        if size < 1 or size > min(self.max_size, MAX_PACKED_QUEUE_SIZE):
            raise QueueError(f"bad queue size {size} (max {self.max_size})")
        if self.avail_pos >= size or self.used_pos >= size:
            raise QueueError(
                f"vring base (available {self.avail_pos}, used {self.used_pos})"
                f" outside a ring of {size}"
            )

    def _bind(self, mem: GuestMemory) -> None:
        self.validate()
        size = self.size
        for addr, align, what in (
            (self.desc_addr, 16, "descriptor ring"),
            (self.avail_addr, 4, "driver area"),
            (self.used_addr, 4, "device area"),
        ):
            if addr % align:  # 2.8.10.1
                raise QueueError(f"{what} at {addr:#x}, not {align}-byte aligned")
        try:
            ring = mem.translate(self.desc_addr, 16 * size)
            driver = mem.translate(self.avail_addr, 4)
            device = mem.translate(self.used_addr, 4)
        except GuestMemoryError as err:
            raise QueueError(f"ring outside guest memory: {err}") from err
        self._ring = ring
        self._ring16 = ring.cast("H")
        self._drv16 = driver.cast("H")
        self._dev16 = device.cast("H")
        self._mem = mem

    def unbind(self) -> None:
        """Forget the ring views (before the memory they point into is unmapped)."""
        self._mem = None
        self._ring = memoryview(b"")
        self._ring16 = self._drv16 = self._dev16 = memoryview(b"").cast("H")

    def attach_inflight(self, mem: GuestMemory, inflight: PackedInflight | None) -> int:
        """Track chains in ``inflight`` from now on; return how many must be resubmitted.

        With a region that already holds state (the backend restarted), the queue resumes from
        it, whatever SET_VRING_BASE said (a frontend that lost the backend cannot know): the
        used side where the region last committed it, the chains still in flight handed out
        again first, oldest first, rebuilt from the region's copies of their descriptors (the
        ring may have overwritten them), and the available side past all of them.
        """
        self.inflight = inflight
        self._resubmit = []
        if inflight is None:
            return 0
        if mem is not self._mem:
            self._bind(mem)
        size = self.size
        if size > inflight.desc_num:
            raise QueueError(f"queue of {size} with an inflight region of {inflight.desc_num}")
        found = inflight.recover(self._ring16, size, self.used_pos, self.used_wrap)
        if found is None:
            return 0
        used_pos, used_wrap, chains = found
        total = sum(count for _, count, _ in chains)
        if total > size:
            raise QueueError(f"{total} descriptors in flight in a ring of {size}")
        self.used_pos, self.used_wrap = used_pos, used_wrap
        pos = used_pos + total
        wrap = used_wrap ^ (pos >= size)
        self.avail_pos = pos - size if pos >= size else pos
        self._avail_bits = _F_AVAIL if wrap else VIRTQ_DESC_F_USED
        self._ndesc = {}
        for bid, count, descs in chains:
            readable: list[Buffer] = []
            writable: list[Buffer] = []
            for addr, length, flags, _ in descs:
                if flags & _INDIRECT:
                    if count != 1:
                        raise QueueError(f"inflight chain {bid}: indirect in a list")
                    self._indirect(mem, bid, addr, length, (readable, writable))
                else:
                    _append(bid, addr, length, flags, (readable, writable))
            self._resubmit.append(DescriptorChain(bid, readable, writable))
            if count != 1:
                self._ndesc[bid] = count
        self.next_avail = (self.next_used + len(chains)) & 0xFFFF
        self.signalled_valid = False
        return len(chains)

    # -- available descriptors --------------------------------------------------------------

    def has_available(self, mem: GuestMemory) -> bool:
        """Whether a chain is waiting at the available position."""
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit:
            return True
        return self._ring16[8 * self.avail_pos + 7] & _WRAP_BITS == self._avail_bits

    def _scan(self) -> tuple[int, int, int]:
        """(chains, position, avail bits) where the driver's available descriptors end.

        The driver fills the ring in order and exposes a chain's head last, so the first
        descriptor not available is where it will put the next one.
        """
        ring16 = self._ring16
        size = self.size
        pos, bits = self.avail_pos, self._avail_bits
        chains = 0
        for _ in range(size):
            flags = ring16[8 * pos + 7]
            if flags & _WRAP_BITS != bits:
                break
            if not flags & _NEXT:
                chains += 1
            pos += 1
            if pos == size:
                pos = 0
                bits ^= _WRAP_BITS
        return chains, pos, bits

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        if mem is not self._mem:
            self._bind(mem)
        return len(self._resubmit) + self._scan()[0]

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or ``None`` when the ring is empty."""
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit:
            return self._resubmit.pop(0)
        pos = self.avail_pos
        bits = self._avail_bits
        flags = self._ring16[8 * pos + 7]
        if flags & _WRAP_BITS != bits:
            return None
        kind = flags ^ bits
        if not kind & _CHAINED:  # the common case: one descriptor
            addr, length, bid, _ = _desc_unpack(self._ring, 16 * pos)
            if kind & _WRITE:
                chain = DescriptorChain(bid, [], [(addr, length)])
            else:
                chain = DescriptorChain(bid, [(addr, length)], [])
            count = 1
        else:
            chain, count = self._walk(mem, pos, bits)
            if count != 1:
                self._ndesc[chain.head] = count
        inflight = self.inflight
        if inflight is not None:
            with inflight.lock:
                inflight.begin(self._ring, pos, count, self.size)
        pos += count
        if pos >= self.size:
            pos -= self.size
            self._avail_bits = bits ^ _WRAP_BITS
        self.avail_pos = pos
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def pop_burst(self, mem: GuestMemory, limit: int, *, write: bool = False) -> list[Popped]:
        """Take up to ``limit`` available chains (:meth:`SplitQueue.pop_burst`'s contract).

        A chain that is one descriptor of the direction asked for, neither chained nor
        indirect, comes as ``(id, addr, length, None)``; every other one as ``(id, 0, 0,
        chain)``. A chain that cannot be walked ends the burst and stays available, so the
        next call raises its :class:`QueueError`.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit:
            chain = self.pop(mem)  # after a backend restart only: one at a time
            return [] if chain is None else [(chain.head, 0, 0, chain)]
        ring16 = self._ring16
        ring = self._ring
        size = self.size
        pos = self.avail_pos
        bits = self._avail_bits
        want = _WRITE if write else 0
        inflight = self.inflight
        out: list[Popped] = []
        append = out.append
        for _ in range(limit):
            flags = ring16[8 * pos + 7]
            if flags & _WRAP_BITS != bits:
                break
            if flags ^ bits == want:
                addr, length, bid, _ = _desc_unpack(ring, 16 * pos)
                append((bid, addr, length, None))
                count = 1
            else:
                try:
                    chain, count = self._walk(mem, pos, bits)
                except QueueError:
                    if out:
                        break  # the next call raises it, once the chains before it are handled
                    raise
                append((chain.head, 0, 0, chain))
                if count != 1:
                    self._ndesc[chain.head] = count
            if inflight is not None:
                with inflight.lock:
                    inflight.begin(ring, pos, count, size)
            pos += count
            if pos >= size:
                pos -= size
                bits ^= _WRAP_BITS
        self.avail_pos = pos
        self._avail_bits = bits
        self.next_avail = (self.next_avail + len(out)) & 0xFFFF
        return out

    def pop_frames(
        self,
        mem: GuestMemory,
        limit: int,
        *,
        skip: int = 0,
        min_len: int = 0,
        max_len: int = 0xFFFFFFFF,
        zero_prefix: int = 0,
        write: bool = False,
        max_bytes: int = -1,
    ) -> tuple[list[memoryview], bytes]:
        """Take up to ``limit`` chains while each is the common simple case
        (:meth:`SplitQueue.pop_frames`'s contract; in C where built).

        One descriptor of the direction asked for, of ``min_len`` to ``max_len`` bytes, in one
        memory region, its first ``zero_prefix`` bytes zero (and, with ``max_bytes``, while
        the views add up to no more). Returns views past ``skip`` bytes and the buffer ids as
        native uint16s, for :meth:`add_used_heads`. With inflight tracking, or chains to
        resubmit, takes nothing.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit or self.inflight is not None:
            return [], b""
        min_len = max(min_len, skip + zero_prefix)
        want = _WRITE if write else 0
        if _fastring is not None and max_bytes < 0:
            taken, ids, self.avail_pos, self._avail_bits = _fastring.packed_pop(
                self._ring, self.size, self.avail_pos, self._avail_bits, limit, want,
                mem.table, skip, min_len, max_len, zero_prefix,
            )  # fmt: skip
            self.next_avail = (self.next_avail + len(taken)) & 0xFFFF
            return taken, ids
        ring16 = self._ring16
        ring = self._ring
        size = self.size
        pos = self.avail_pos
        bits = self._avail_bits
        translate = mem.translate
        zeros = bytes(zero_prefix)
        views: list[memoryview] = []
        heads = array.array("H")
        total = 0
        for _ in range(min(limit, size)):  # one lap at most
            flags = ring16[8 * pos + 7]
            if flags & _WRAP_BITS != bits or flags ^ bits != want:
                break
            addr, length, bid, _ = _desc_unpack(ring, 16 * pos)
            if not min_len <= length <= max_len:
                break
            total += length - skip
            if 0 <= max_bytes < total:
                break
            try:
                buf = translate(addr, length)
            except GuestMemoryError:
                break
            if zero_prefix and buf[:zero_prefix] != zeros:
                break
            views.append(buf[skip:])
            heads.append(bid)
            pos += 1
            if pos == size:
                pos = 0
                bits ^= _WRAP_BITS
        self.avail_pos = pos
        self._avail_bits = bits
        self.next_avail = (self.next_avail + len(views)) & 0xFFFF
        return views, heads.tobytes()

    def pop_batch(
        self,
        mem: GuestMemory,
        into: bytearray,
        limit: int,
        *,
        skip: int = 0,
        min_len: int = 0,
        max_len: int = 0xFFFFFFFF,
        zero_prefix: int = 0,
    ) -> tuple[FrameBatch, bytes]:
        """The chains :meth:`pop_frames` takes, as many as fit, copied back to back into
        ``into`` (:meth:`SplitQueue.pop_batch`'s contract; in C where built)."""
        if _fastring is not None:
            if mem is not self._mem:
                self._bind(mem)
            if self._resubmit or self.inflight is not None:
                return FrameBatch(into, b""), b""
            ends, ids, self.avail_pos, self._avail_bits = _fastring.packed_pop(
                self._ring, self.size, self.avail_pos, self._avail_bits, limit, 0, mem.table,
                skip, max(min_len, skip + zero_prefix), max_len, zero_prefix, into,
            )  # fmt: skip
            self.next_avail = (self.next_avail + len(ids) // 2) & 0xFFFF
            return FrameBatch(into, ends), ids
        views, heads = self.pop_frames(
            mem, limit, skip=skip, min_len=min_len, max_len=max_len,
            zero_prefix=zero_prefix, max_bytes=len(into),
        )  # fmt: skip
        return FrameBatch.into(into, views), heads

    def fill_batch(
        self, mem: GuestMemory, batch: FrameBatch, start: int = 0, prefix: bytes = b""
    ) -> int:
        """Copy ``prefix`` + frame into the next available chain for each frame of ``batch``
        from ``start`` on, in order, while that chain is one device-writable buffer with room
        for it; return them together (:meth:`SplitQueue.fill_batch`'s contract). Returns how
        many were placed."""
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit or self.inflight is not None or start >= len(batch):
            return 0
        if _fastring is not None:
            count, self.avail_pos, self._avail_bits, self.used_pos, self.used_wrap = (
                _fastring.packed_fill(
                    self._ring, self.size, self.avail_pos, self._avail_bits, self.used_pos,
                    self.used_wrap, mem.table, batch.data, batch.ends, start, prefix,
                )
            )  # fmt: skip
            self._count_used(count, count)
            self.next_avail = (self.next_avail + count) & 0xFFFF
            return count
        frames = batch.frames(start, min(len(batch), start + self.size))  # one lap at most
        ring16 = self._ring16
        ring = self._ring
        size = self.size
        pos = self.avail_pos
        bits = self._avail_bits
        plen = len(prefix)
        used: list[tuple[int, int]] = []
        for frame in frames:
            flags = ring16[8 * pos + 7]
            if flags & _WRAP_BITS != bits or flags ^ bits != _WRITE:
                break
            addr, length, bid, _ = _desc_unpack(ring, 16 * pos)
            need = plen + len(frame)
            if need > length:
                break
            try:
                view = mem.translate(addr, need)
            except GuestMemoryError:
                break
            view[:plen] = prefix
            view[plen:] = frame
            used.append((bid, need))
            pos += 1
            if pos == size:
                pos = 0
                bits ^= _WRAP_BITS
        self.avail_pos = pos
        self._avail_bits = bits
        if used:
            self.next_avail = (self.next_avail + len(used)) & 0xFFFF
            self.add_used_many(mem, used)
        return len(used)

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains taken (nothing was returned since).

        Their descriptors are still in the ring, untouched (used descriptors are written
        behind them), so the available position steps back over them: each chain ends with a
        descriptor without NEXT, and the descriptor before a chain's head never has NEXT.
        Not for chains resubmitted after a restart.
        """
        ring16 = self._ring16
        size = self.size
        pos, bits = self.avail_pos, self._avail_bits
        inflight = self.inflight
        for _ in range(count):
            pos -= 1
            if pos < 0:
                pos = size - 1
                bits ^= _WRAP_BITS
            bid = ring16[8 * pos + 6]  # the chain's last descriptor holds its id
            for _ in range(size - 1):
                prev, pbits = pos - 1, bits
                if prev < 0:
                    prev = size - 1
                    pbits ^= _WRAP_BITS
                flags = ring16[8 * prev + 7]
                if not flags & _NEXT or flags & _WRAP_BITS != pbits:
                    break
                pos, bits = prev, pbits
            if inflight is not None:
                with inflight.lock:
                    inflight.unbegin(bid)
        self.avail_pos, self._avail_bits = pos, bits
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def _walk(self, mem: GuestMemory, pos: int, bits: int) -> tuple[DescriptorChain, int]:
        """Walk the chain whose head is available at ``pos``: (chain, ring descriptors).

        Sections 2.8.5 to 2.8.7: a list of at most a queue's worth of consecutive available
        descriptors, device-readable ones first, or a single descriptor naming an indirect
        table (never inside a list).
        """
        ring = self._ring
        size = self.size
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        bufs = (readable, writable)
        p = pos
        count = 0
        while True:
            addr, length, bid, flags = _desc_unpack(ring, 16 * p)
            if flags & _WRAP_BITS != bits:
                raise QueueError(f"chain at {pos}: descriptor {p} of its list is not available")
            count += 1
            if flags & _INDIRECT:
                if count != 1 or flags & _NEXT:
                    raise QueueError(f"chain at {pos}: indirect descriptor in a list")
                self._indirect(mem, bid, addr, length, bufs)
                return DescriptorChain(bid, readable, writable), 1
            if flags & _WRITE:  # _append(), inlined: this runs for every descriptor
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"buffer {bid}: device-readable element after a writable one")
            else:
                readable.append((addr, length))
            if not flags & _NEXT:
                return DescriptorChain(bid, readable, writable), count
            if count >= size:
                raise QueueError(f"chain at {pos}: a list of more than {size} descriptors")
            p += 1
            if p == size:
                p = 0
                bits ^= _WRAP_BITS

    @staticmethod
    def _indirect(
        mem: GuestMemory, bid: int, addr: int, length: int, bufs: tuple[list[Buffer], list[Buffer]]
    ) -> None:
        """The buffers of an indirect table (2.8.7): WRITE is its descriptors' only flag."""
        if length == 0 or length % 16:
            raise QueueError(f"buffer {bid}: indirect table of {length} bytes")
        if length // 16 > MAX_INDIRECT:
            raise QueueError(f"buffer {bid}: indirect table of {length // 16} entries")
        try:
            table = mem.translate(addr, length)
        except GuestMemoryError as err:
            raise QueueError(f"buffer {bid}: indirect table: {err}") from err
        for off in range(0, length, 16):
            a, n, _, flags = _desc_unpack(table, off)
            _append(bid, a, n, flags & _WRITE, bufs)

    # -- used descriptors -------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return buffer ``head`` with ``length`` bytes written (2.8.3, 2.8.4, 2.8.6)."""
        if mem is not self._mem:
            self._bind(mem)
        if self.inflight is not None:
            self._add_used_tracked([(head, length)])
            return
        count = self._ndesc.pop(head, 1) if self._ndesc else 1
        pos = self.used_pos
        _len_id_pack(self._ring, 16 * pos + 8, length, head)
        self._ring16[8 * pos + 7] = (_WRAP_BITS if self.used_wrap else 0) | (
            _WRITE if length else 0
        )
        pos += count
        if pos >= self.size:
            pos -= self.size
            self.used_wrap ^= 1
        self.used_pos = pos
        self.used_count = (self.used_count + count) & 0xFFFF
        self.next_used = (self.next_used + 1) & 0xFFFF

    def add_used_many(self, mem: GuestMemory, entries: list[tuple[int, int]]) -> None:
        """Return several buffers; the first one's flags are stored last, so the driver sees
        them together (virtio-net's merged receive buffers need that: 5.1.6.4, 2.8.9)."""
        if mem is not self._mem:
            self._bind(mem)
        if not entries:
            return
        if self.inflight is not None:
            self._add_used_tracked(entries)
            return
        self._write_used(entries)

    def _write_used(self, entries: list[tuple[int, int]]) -> None:
        ring = self._ring
        ring16 = self._ring16
        ndesc = self._ndesc
        size = self.size
        pos = self.used_pos
        wrap = self.used_wrap
        first = 8 * pos + 7
        first_flags = 0
        total = 0
        for head, length in entries:
            count = ndesc.pop(head, 1) if ndesc else 1
            _len_id_pack(ring, 16 * pos + 8, length, head)
            flags = (_WRAP_BITS if wrap else 0) | (_WRITE if length else 0)
            if total:
                ring16[8 * pos + 7] = flags
            else:
                first_flags = flags
            total += count
            pos += count
            if pos >= size:
                pos -= size
                wrap ^= 1
        ring16[first] = first_flags
        self.used_pos = pos
        self.used_wrap = wrap
        self._count_used(len(entries), total)

    def _add_used_tracked(self, entries: list[tuple[int, int]]) -> None:
        """Return buffers with the inflight region kept in step (vhost-user.rst, "When
        supplying used buffers to the driver"): free the entries, record the used position,
        publish, then clear the marks and commit."""
        inflight = self.inflight
        assert inflight is not None
        ndesc = self._ndesc
        pos, wrap = self.used_pos, self.used_wrap
        for head, _ in entries:
            pos += ndesc.get(head, 1)
            if pos >= self.size:
                pos -= self.size
                wrap ^= 1
        with inflight.lock:
            heads = inflight.pre_put([head for head, _ in entries])
            inflight.set_used(pos, wrap)
            self._write_used(entries)
            inflight.post_put(heads)

    def add_used_heads(self, mem: GuestMemory, heads: bytes, length: int = 0) -> None:
        """Return the buffers ``heads`` (from :meth:`pop_frames`), ``length`` bytes written to
        each, together (in C where built, for buffers of one descriptor)."""
        if mem is not self._mem:
            self._bind(mem)
        ids = memoryview(heads).cast("H")
        if (
            _fastring is not None
            and self.inflight is None
            and (not self._ndesc or self._ndesc.keys().isdisjoint(ids))
        ):
            self.used_pos, self.used_wrap = _fastring.packed_publish(
                self._ring, self.size, self.used_pos, self.used_wrap, heads, length
            )
            self._count_used(len(ids), len(ids))
            return
        self.add_used_many(mem, [(head, length) for head in ids])

    def _count_used(self, entries: int, descriptors: int) -> None:
        self.used_count = (self.used_count + descriptors) & 0xFFFF
        self.next_used = (self.next_used + entries) & 0xFFFF

    # -- notifications (2.8.10) -------------------------------------------------------------

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used descriptors written since the
        last one: the Driver Event Suppression flags, and with EVENT_IDX in DESC mode whether
        the used side passed the descriptor it names."""
        if mem is not self._mem:
            self._bind(mem)
        full_barrier()  # the used descriptors we wrote before the driver's event structure
        new = self.used_count
        old = self.signalled_used
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        flags = self._drv16[1] & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or not valid:
            return True  # ENABLE (or DESC without EVENT_IDX, or reserved): always
        moved = (new - old) & 0xFFFF
        size = self.size
        off_wrap = self._drv16[0]
        # Positions in a double lap: the event descriptor was passed if it lies in the
        # ``moved`` descriptors before the used position (all of them, past 2 * size).
        event = (off_wrap & 0x7FFF) + (0 if off_wrap >> 15 else size)
        now = self.used_pos + (0 if self.used_wrap else size)
        return (now - event - 1) % (2 * size) < moved

    def set_notification(self, mem: GuestMemory, enable: bool) -> bool:
        """Ask the driver for (or spare the device) kicks in the Device Event Suppression
        structure. With EVENT_IDX, enabling names the next available position (DESC mode)
        and disabling writes nothing, as for split rings. Returns ``True`` when, after
        enabling, a chain is already available: the caller must keep processing."""
        if mem is not self._mem:
            self._bind(mem)
        dev16 = self._dev16
        if self.event_idx:
            if not enable:
                return False
            dev16[0] = self.avail_pos | self.avail_wrap << 15
            dev16[1] = RING_EVENT_FLAGS_DESC
        else:
            if not enable:
                dev16[1] = RING_EVENT_FLAGS_DISABLE
                return False
            dev16[1] = RING_EVENT_FLAGS_ENABLE
        full_barrier()  # the store above before the load below
        if self._resubmit:
            return True
        return self._ring16[8 * self.avail_pos + 7] & _WRAP_BITS == self._avail_bits

    def want_more(self, mem: GuestMemory) -> bool:
        """Ask for a kick once the driver makes available more than it has now (a device
        that found the available chains too few, e.g. merged receive buffers for a frame).
        Returns ``True`` when the driver already did, so the caller tries again."""
        if mem is not self._mem:
            self._bind(mem)
        _, pos, bits = self._scan()
        dev16 = self._dev16
        if self.event_idx:
            dev16[0] = pos | (1 if bits == _F_AVAIL else 0) << 15
            dev16[1] = RING_EVENT_FLAGS_DESC
        else:
            dev16[1] = RING_EVENT_FLAGS_ENABLE
        full_barrier()
        return self._ring16[8 * pos + 7] & _WRAP_BITS == bits


def _append(
    bid: int, addr: int, length: int, flags: int, bufs: tuple[list[Buffer], list[Buffer]]
) -> None:
    """Add one element to the (readable, writable) lists of a chain (device-readable first)."""
    readable, writable = bufs
    if flags & _WRITE:
        writable.append((addr, length))
    elif writable:
        raise QueueError(f"buffer {bid}: device-readable element after a writable one")
    else:
        readable.append((addr, length))
