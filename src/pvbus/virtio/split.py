"""The split virtqueue, device side (VIRTIO 1.2 section 2.7).

:class:`SplitQueue` holds only queue state (size, ring addresses, indices, negotiated ring
features); every operation takes the :class:`GuestMemory` it works on, and the ring views are
re-derived whenever a different memory object is passed. Chains are walked eagerly into lists
of (address, length) pairs, device-readable first (section 2.7.4.2), with a loop guard: no chain
may visit more descriptors than the table holds (section 2.7.5.3.2). Anything malformed raises
:class:`QueueError`; buffer addresses are translated by the device, so a bad data address can
still be answered with an error status.
"""

from __future__ import annotations

import array
import struct

from pvbus.virtio.barrier import full_barrier
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.inflight import SplitInflight
from pvbus.virtio.memory import GuestMemory

try:
    from pvbus.virtio import _fastring
except ImportError:  # not built (no C compiler): the Python loops below do the same
    _fastring = None  # type: ignore[assignment]

#: Whether the C loops of :meth:`SplitQueue.pop_frames` and ``add_used_heads`` are in use.
FAST_RING = _fastring is not None

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_desc_unpack = _DESC.unpack_from
_u16_unpack = _U16.unpack_from
_used_pack = _USED_ELEM.pack_into
# Fields the driver reads while the device writes them (used idx and flags, avail_event) are
# stored through a 16-bit view: one store each. ``Struct.pack_into`` zeroes its target before
# packing, so a driver running concurrently could read a transient 0 there.

#: Largest indirect table accepted, in descriptors (Linux never builds more than a queue's worth).
MAX_INDIRECT = MAX_QUEUE_SIZE

Buffer = tuple[int, int]
"""A guest buffer: (guest-physical address, length)."""


class DescriptorChain:
    """One available request: its head index and its buffers.

    ``readable`` are the device-readable buffers (driver to device), ``writable`` the
    device-writable ones that follow them.
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[Buffer], writable: list[Buffer]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"
        )

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


Popped = tuple[int, int, int, DescriptorChain | None]
"""One entry of :meth:`SplitQueue.pop_burst`: (head, address, length, chain).

``chain`` is ``None`` when the chain is the one buffer (address, length); otherwise the
address and length are 0 and ``chain`` holds its buffers.
"""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` passes ``event_idx`` (2.7.10)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class SplitQueue:
    """Device-side state of one split virtqueue.

    Set ``size`` and the three guest-physical ring addresses, then ``ready = True``. Indices are
    free-running 16-bit counters as in the spec; ``next_avail`` is the vring base that
    GET_VRING_BASE returns and SET_VRING_BASE restores.
    """

    __slots__ = (
        "_avail",
        "_desc",
        "_mem",
        "_resubmit",
        "_used",
        "_used16",
        "avail_addr",
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
    )

    def __init__(self, max_size: int = 1024) -> None:
        self.max_size = max_size
        self.size = max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self._mem: GuestMemory | None = None
        self._desc = memoryview(b"")
        self._avail = memoryview(b"")
        self._used = memoryview(b"")
        self._used16 = memoryview(b"").cast("H")
        #: Inflight tracking (vhost-user INFLIGHT_SHMFD), when the frontend shares a region.
        self.inflight: SplitInflight | None = None
        self._resubmit: list[int] = []

    def reset(self) -> None:
        """Back to the state after device reset (section 2.1.2)."""
        self.__init__(self.max_size)  # type: ignore[misc]

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: the next available index to process, also the used index."""
        self.next_avail = base & 0xFFFF
        self.next_used = base & 0xFFFF
        self.signalled_valid = False

    # -- ring views -------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the size (a power of two, section 2.7) before the queue is used."""
        size = self.size
        if size < 1 or size > self.max_size or size & (size - 1):
            raise QueueError(f"bad queue size {size} (max {self.max_size}, power of two)")

    def _bind(self, mem: GuestMemory) -> None:
        self.validate()
        size = self.size
        try:
            self._desc = mem.translate(self.desc_addr, 16 * size)
            self._avail = mem.translate(self.avail_addr, 6 + 2 * size)
            self._used = mem.translate(self.used_addr, 6 + 8 * size)
        except GuestMemoryError as err:
            raise QueueError(f"ring outside guest memory: {err}") from err
        if self.used_addr % 2:
            raise QueueError(f"used ring at odd address {self.used_addr:#x}")
        self._used16 = self._used.cast("H")
        self._mem = mem

    def unbind(self) -> None:
        """Forget the ring views (before the memory they point into is unmapped)."""
        self._mem = None
        self._desc = self._avail = self._used = memoryview(b"")
        self._used16 = memoryview(b"").cast("H")

    def attach_inflight(self, mem: GuestMemory, inflight: SplitInflight | None) -> int:
        """Track chains in ``inflight`` from now on; return how many must be resubmitted.

        With a region that already holds state (the backend restarted), the queue resumes
        from it: the used index is the ring's, the chains still in flight are handed out
        again first, oldest first, and the available index is past them.
        """
        self.inflight = inflight
        self._resubmit = []
        if inflight is None:
            return 0
        if mem is not self._mem:
            self._bind(mem)
        if self.size > inflight.desc_num:
            raise QueueError(f"queue of {self.size} with an inflight region of {inflight.desc_num}")
        ring_used = self._used16[1]
        heads = inflight.recover(ring_used)
        if heads is None:
            return 0
        self.next_used = ring_used
        self.next_avail = (ring_used + len(heads)) & 0xFFFF
        self.signalled_valid = False
        self._resubmit = heads
        return len(heads)

    # -- the available ring -----------------------------------------------------------------

    def avail_idx(self, mem: GuestMemory) -> int:
        """The driver's available index."""
        if mem is not self._mem:
            self._bind(mem)
        idx: int = _u16_unpack(self._avail, 2)[0]
        return idx

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"available index runs {n} ahead of a queue of {self.size}")
        return n

    def has_available(self, mem: GuestMemory) -> bool:
        """Whether the driver has made a chain available that the device has not taken."""
        return self.avail_idx(mem) != self.next_avail

    def want_more(self, mem: GuestMemory) -> bool:
        """Ask for a kick once the driver makes available more than it has now (a device
        that found the available chains too few, e.g. merged receive buffers for a frame):
        avail_event is the driver's current index rather than ours (2.7.10). Returns ``True``
        when the driver already added more, so the caller tries again (the re-check after
        enabling closes the race)."""
        ours = self.next_avail
        self.next_avail = self.avail_idx(mem)
        try:
            return self.set_notification(mem, True)
        finally:
            self.next_avail = ours

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains taken (nothing was returned since)."""
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or ``None`` when the ring is empty."""
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit:
            return self.walk(mem, self._resubmit.pop(0))
        avail = self._avail
        n = (_u16_unpack(avail, 2)[0] - self.next_avail) & 0xFFFF
        if n == 0:
            return None
        size = self.size
        if n > size:
            raise QueueError(f"available index runs {n} ahead of a queue of {size}")
        head: int = _u16_unpack(avail, 4 + 2 * (self.next_avail % size))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        chain = self.walk(mem, head)
        if self.inflight is not None:
            self.inflight.begin(head)
        return chain

    def pop_burst(self, mem: GuestMemory, limit: int, *, write: bool = False) -> list[Popped]:
        """Take up to ``limit`` available chains, reading the available index once.

        Each entry is ``(head, addr, length, chain)``. A chain that is one descriptor of the
        direction asked for (device-readable, or device-writable with ``write``), neither
        chained nor indirect, comes as its one buffer with ``chain`` ``None``: no
        :class:`DescriptorChain` is built for it. Every other chain is walked as :meth:`pop`
        walks it and comes as ``(head, 0, 0, chain)``.

        Errors keep :meth:`pop` 's order: a chain that cannot be walked ends the burst and
        stays available, so the caller handles the chains before it, and the next call raises
        its :class:`QueueError` (sections 2.7.5.3.2, 2.7.13). An empty list means the ring is
        empty.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit:
            chain = self.pop(mem)  # after a backend restart only: one at a time
            return [] if chain is None else [(chain.head, 0, 0, chain)]
        avail = self._avail
        nxt = self.next_avail
        n = (_u16_unpack(avail, 2)[0] - nxt) & 0xFFFF
        if n == 0:
            return []
        size = self.size
        if n > size:
            raise QueueError(f"available index runs {n} ahead of a queue of {size}")
        table = self._desc
        ring = avail.cast("H")  # one view per burst: an index is cheaper than an unpack
        mask = size - 1
        want = VIRTQ_DESC_F_WRITE if write else 0
        inflight = self.inflight
        out: list[Popped] = []
        append = out.append
        for _ in range(n if n < limit else limit):
            head: int = ring[2 + (nxt & mask)]
            if head < size:
                addr, length, flags, _ = _desc_unpack(table, 16 * head)
                if flags == want:
                    append((head, addr, length, None))
                    nxt = (nxt + 1) & 0xFFFF
                    if inflight is not None:
                        inflight.begin(head)
                    continue
            if out:
                try:
                    chain = self.walk(mem, head)
                except QueueError:
                    break  # the next call raises it, once the chains before it are handled
            else:
                self.next_avail = (nxt + 1) & 0xFFFF  # as pop() leaves it when walk() raises
                chain = self.walk(mem, head)
            append((head, 0, 0, chain))
            nxt = (nxt + 1) & 0xFFFF
            if inflight is not None:
                inflight.begin(head)
        self.next_avail = nxt
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
    ) -> tuple[list[memoryview], bytes]:
        """Take up to ``limit`` available chains while each is the common simple case.

        That is: one descriptor of the direction asked for (device-readable, or device-writable
        with ``write``), neither chained nor indirect, of ``min_len`` to ``max_len`` bytes, in
        one memory region, whose first ``zero_prefix`` bytes are zero (a virtio-net header that
        asks for nothing, say). The first chain that is anything else stays available for
        :meth:`pop` / :meth:`pop_burst`, which walk it and raise what is wrong with it.

        Returns views of the buffers past their first ``skip`` bytes and the heads as native
        uint16s, for :meth:`add_used_heads` (:meth:`pop_batch` copies them instead). With
        inflight tracking, or chains to resubmit, it takes nothing (the caller's general path
        handles those). The loop runs in C where ``pvbus.virtio._fastring`` is built
        (:data:`FAST_RING`), else in Python.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit or self.inflight is not None:
            return [], b""
        min_len = max(min_len, skip + zero_prefix)
        want = VIRTQ_DESC_F_WRITE if write else 0
        if _fastring is not None:
            views, heads, self.next_avail = _fastring.pop_frames(
                self._desc, self._avail, self.size, self.next_avail, limit, want,
                mem.table, skip, min_len, max_len, zero_prefix,
            )  # fmt: skip
            return views, heads
        return self._pop_frames_py(
            mem, limit, want=want, skip=skip, min_len=min_len, max_len=max_len,
            zero_prefix=zero_prefix,
        )  # fmt: skip

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
        """The chains :meth:`pop_frames` takes (device-readable ones), as many as fit, copied
        back to back into ``into``: a :class:`FrameBatch` on that buffer, for a consumer that
        keeps frames after their chains are returned (and recycles its buffers), with no
        Python object per frame. Returns the batch and the heads. In C where built.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit or self.inflight is not None:
            return FrameBatch(into, b""), b""
        min_len = max(min_len, skip + zero_prefix)
        if _fastring is not None:
            ends, heads, self.next_avail = _fastring.pop_batch(
                self._desc, self._avail, self.size, self.next_avail, limit, 0,
                mem.table, skip, min_len, max_len, zero_prefix, into,
            )  # fmt: skip
            return FrameBatch(into, ends), heads
        views, heads = self._pop_frames_py(
            mem, limit, want=0, skip=skip, min_len=min_len, max_len=max_len,
            zero_prefix=zero_prefix, max_bytes=len(into),
        )  # fmt: skip
        return FrameBatch.into(into, views), heads

    def _pop_frames_py(
        self,
        mem: GuestMemory,
        limit: int,
        *,
        want: int,
        skip: int,
        min_len: int,
        max_len: int,
        zero_prefix: int,
        max_bytes: int = -1,
    ) -> tuple[list[memoryview], bytes]:
        size = self.size
        total = 0
        nxt = self.next_avail
        n = self._available()
        ring = self._avail.cast("H")
        table = self._desc
        views: list[memoryview] = []
        heads = array.array("H")
        zeros = bytes(zero_prefix)
        for i in range(min(n, limit)):
            head: int = ring[2 + (nxt + i) % size]
            if head >= size:
                break
            addr, length, flags, _ = _desc_unpack(table, 16 * head)
            if flags != want or not min_len <= length <= max_len:
                break
            total += length - skip
            if 0 <= max_bytes < total:
                break
            try:
                buf = mem.translate(addr, length)
            except GuestMemoryError:
                break
            if buf[:zero_prefix] != zeros:
                break
            views.append(buf[skip:])
            heads.append(head)
        self.next_avail = (nxt + len(heads)) & 0xFFFF
        return views, heads.tobytes()

    def _available(self) -> int:
        """Chains available past ``next_avail`` for the common-case loops; 0 for an index more
        than a queue ahead, which :meth:`pop` raises (the C loops' ``available()``)."""
        n: int = (_u16_unpack(self._avail, 2)[0] - self.next_avail) & 0xFFFF
        return n if n <= self.size else 0

    def fill_batch(
        self, mem: GuestMemory, batch: FrameBatch, start: int = 0, prefix: bytes = b""
    ) -> int:
        """Copy ``prefix`` + frame into the next available chain for each frame of ``batch``
        from ``start`` on, in order, while that chain is one device-writable buffer with room
        for it; publish the used entries once after all of them (section 2.7.8). Returns how
        many were placed.

        The first frame that does not fit so leaves its chain available for :meth:`pop`.
        With inflight tracking or chains to resubmit, it places nothing. In C where built.
        """
        if mem is not self._mem:
            self._bind(mem)
        if self._resubmit or self.inflight is not None or start >= len(batch):
            return 0
        if _fastring is not None:
            count, self.next_avail, self.next_used = _fastring.fill_batch(
                self._desc, self._avail, self._used, self.size, self.next_avail,
                self.next_used, mem.table, batch.data, batch.ends, start, prefix,
            )  # fmt: skip
            return count
        size = self.size
        nxt = self.next_avail
        ring = self._avail.cast("H")
        used: list[tuple[int, int]] = []
        for index in range(start, min(len(batch), start + self._available())):
            head: int = ring[2 + (nxt + len(used)) % size]
            if head >= size:
                break
            addr, length, flags, _ = _desc_unpack(self._desc, 16 * head)
            frame = batch.frame(index)
            need = len(prefix) + len(frame)
            if flags != VIRTQ_DESC_F_WRITE or need > length:
                break
            try:
                view = mem.translate(addr, need)
            except GuestMemoryError:
                break
            view[: len(prefix)] = prefix
            view[len(prefix) :] = frame
            used.append((head, need))
        self.next_avail = (nxt + len(used)) & 0xFFFF
        if used:
            self.add_used_many(mem, used)
        return len(used)

    def add_used_heads(self, mem: GuestMemory, heads: bytes, length: int = 0) -> None:
        """Return the chains ``heads`` (from :meth:`pop_frames`), ``length`` bytes written to
        each, publishing the used index once after all of them (section 2.7.8)."""
        if mem is not self._mem:
            self._bind(mem)
        if _fastring is not None and self.inflight is None:
            self.next_used = _fastring.publish_used(
                self._used, self.size, self.next_used, heads, length
            )
            return
        self.add_used_many(mem, [(head, length) for head in memoryview(heads).cast("H")])

    def walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        """Walk the chain that starts at descriptor ``head`` (sections 2.7.5, 2.7.5.3)."""
        size = self.size
        if head >= size:
            raise QueueError(f"chain head {head} outside a queue of {size}")
        table = self._desc
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        index = head
        hops = 0
        limit = size
        indirect = False
        while True:
            addr, length, flags, nxt = _desc_unpack(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError(f"chain {head}: indirect descriptor inside an indirect table")
                if length == 0 or length % 16:
                    raise QueueError(f"chain {head}: indirect table of {length} bytes")
                if length // 16 > MAX_INDIRECT:
                    raise QueueError(f"chain {head}: indirect table of {length // 16} entries")
                try:
                    table = mem.translate(addr, length)
                except GuestMemoryError as err:
                    raise QueueError(f"chain {head}: indirect table: {err}") from err
                indirect = True
                limit = length // 16
                size = limit
                index = 0
                hops = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"chain {head}: device-readable buffer after a writable one")
            else:
                readable.append((addr, length))
            hops += 1
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            if nxt >= size:
                raise QueueError(f"chain {head}: next index {nxt} outside a table of {size}")
            if hops >= limit:
                raise QueueError(f"chain {head}: loop (more than {limit} descriptors)")
            index = nxt

    # -- the used ring ----------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written (section 2.7.8)."""
        if mem is not self._mem:
            self._bind(mem)
        used = self._used
        idx = self.next_used
        inflight = self.inflight
        if inflight is not None:
            inflight.pre_put(head)
        _used_pack(used, 4 + 8 * (idx % self.size), head, length)
        idx = (idx + 1) & 0xFFFF
        self.next_used = idx
        self._used16[1] = idx
        if inflight is not None:
            inflight.post_put(head, idx)

    def add_used_many(self, mem: GuestMemory, entries: list[tuple[int, int]]) -> None:
        """Return several chains, publishing the used index once, after all of them.

        The driver then sees them together: virtio-net's merged receive buffers must all be
        visible when the first one is (section 5.1.6.4; Linux drops a frame otherwise).
        """
        if mem is not self._mem:
            self._bind(mem)
        used = self._used
        idx = self.next_used
        size = self.size
        inflight = self.inflight
        for head, length in entries:
            if inflight is not None:
                inflight.pre_put(head)
            _used_pack(used, 4 + 8 * (idx % size), head, length)
            idx = (idx + 1) & 0xFFFF
        self.next_used = idx
        self._used16[1] = idx
        if inflight is not None:
            for head, _ in entries:
                inflight.post_put(head, idx)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last one.

        With VIRTIO_F_EVENT_IDX this follows the driver's used_event (section 2.7.10),
        otherwise VIRTQ_AVAIL_F_NO_INTERRUPT (section 2.7.7).
        """
        if mem is not self._mem:
            self._bind(mem)
        full_barrier()  # the used index we published before the driver's event or flags
        new = self.next_used
        if not self.event_idx:
            flags: int = _u16_unpack(self._avail, 0)[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        if not valid:
            return True
        used_event: int = _u16_unpack(self._avail, 4 + 2 * self.size)[0]
        # vring_need_event(used_event, new, old), inlined: this runs once per batch.
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def set_notification(self, mem: GuestMemory, enable: bool) -> bool:
        """Ask the driver for (or spare the device) kicks (sections 2.7.7, 2.7.10).

        With EVENT_IDX, enabling writes avail_event = ``next_avail``. Returns ``True`` when,
        after enabling, more chains are already available: the caller must keep processing,
        since the driver may have added them before it saw the request for kicks.
        """
        if mem is not self._mem:
            self._bind(mem)
        used16 = self._used16
        size = self.size
        if self.event_idx:
            if not enable:  # nothing to write: kicks stop once avail_event is passed
                return False
            used16[2 + 4 * size] = self.next_avail  # avail_event
        else:
            flags = used16[0]
            if not enable:
                used16[0] = flags | VIRTQ_USED_F_NO_NOTIFY
                return False
            used16[0] = flags & ~VIRTQ_USED_F_NO_NOTIFY
        full_barrier()  # the store above before the load below (2.7.10)
        n: int = (_u16_unpack(self._avail, 2)[0] - self.next_avail) & 0xFFFF  # pending(), inlined
        if n > size:
            raise QueueError(f"available index runs {n} ahead of a queue of {size}")
        return n > 0
