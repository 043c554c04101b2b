"""Inflight descriptor tracking (vhost-user.rst "Inflight I/O tracking"), split and packed.

A region of memory shared with the frontend records, per queue, which chains the device has
taken from the available ring and not yet returned. It outlives the backend process: after a
crash, a restarted backend finds there exactly the requests it must resubmit, in the order it
first took them, and where the available ring really stands.

Layout per queue (``QueueRegionSplit``): a 16-byte header (features u64, version u16,
desc_num u16, last_batch_head u16, used_idx u16) and ``desc_num`` entries of 16 bytes
(``DescStateSplit``: inflight u8, 5 bytes padding, next u16, counter u64).
"""

from __future__ import annotations

import struct
import threading

from pvbus.virtio.errors import QueueError

INFLIGHT_VERSION = 1
_ALIGN = 64
_HEADER = struct.Struct("<QHHHH")
_ENTRY = struct.Struct("<B5xHQ")
_U16 = struct.Struct("<H")
_COUNTER = struct.Struct("<Q")
_H_VERSION = 8
_H_DESC_NUM = 10
_H_LAST_BATCH = 12
_H_USED_IDX = 14


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's region takes, 64-byte aligned like libvhost-user and DPDK."""
    return (_HEADER.size + _ENTRY.size * queue_size + _ALIGN - 1) & ~(_ALIGN - 1)


class SplitInflight:
    """One queue's inflight region over a shared ``memoryview``."""

    __slots__ = ("counter", "desc_num", "view")

    def __init__(self, view: memoryview, desc_num: int) -> None:
        if len(view) < queue_region_size(desc_num):
            raise QueueError(f"inflight region of {len(view)} bytes for {desc_num} descriptors")
        self.view = view
        self.desc_num = desc_num
        self.counter = 0

    def _entry(self, head: int) -> int:
        return _HEADER.size + _ENTRY.size * head

    def recover(self, ring_used_idx: int) -> list[int] | None:
        """Prepare the region when the queue starts (the spec's "When reconnecting").

        A fresh region (version 0) is initialised and ``None`` returned. Otherwise the heads
        still in flight are returned, oldest first, after undoing a half-recorded last batch
        (the used index reached the ring but the inflight flags were not yet cleared).
        """
        view = self.view
        _, version, desc_num, last_batch, used_idx = _HEADER.unpack_from(view)
        if version == 0:
            view[: queue_region_size(self.desc_num)] = bytes(queue_region_size(self.desc_num))
            _HEADER.pack_into(view, 0, 0, INFLIGHT_VERSION, self.desc_num, 0, ring_used_idx)
            self.counter = 0
            return None
        if version != INFLIGHT_VERSION or desc_num != self.desc_num:
            raise QueueError(f"inflight region version {version} for {desc_num} descriptors")
        batch = (ring_used_idx - used_idx) & 0xFFFF
        head = last_batch
        for _ in range(min(batch, desc_num)):
            if head >= desc_num:
                raise QueueError(f"inflight batch list reaches descriptor {head}")
            off = self._entry(head)
            view[off] = 0
            head = _U16.unpack_from(view, off + 6)[0]
        _U16.pack_into(view, _H_USED_IDX, ring_used_idx)
        pending = []
        top = -1
        for i in range(desc_num):
            flag, _, counter = _ENTRY.unpack_from(view, self._entry(i))
            if flag == 1:
                pending.append((counter, i))
            top = max(top, counter)
        self.counter = top + 1
        pending.sort()
        return [head for _, head in pending]

    def begin(self, head: int) -> None:
        """Record that chain ``head`` was taken from the available ring."""
        off = _HEADER.size + _ENTRY.size * head
        _COUNTER.pack_into(self.view, off + 8, self.counter)
        self.counter += 1
        self.view[off] = 1

    def pre_put(self, head: int) -> None:
        """Link ``head`` into the batch about to be published (before the used index moves)."""
        view = self.view
        off = _HEADER.size + _ENTRY.size * head
        _U16.pack_into(view, off + 6, _U16.unpack_from(view, _H_LAST_BATCH)[0])
        _U16.pack_into(view, _H_LAST_BATCH, head)

    def post_put(self, head: int, used_idx: int) -> None:
        """Clear ``head`` and record the published used index (after it moved)."""
        self.view[_HEADER.size + _ENTRY.size * head] = 0
        _U16.pack_into(self.view, _H_USED_IDX, used_idx)

    def in_flight(self) -> list[int]:
        """Heads currently marked in flight (for stats and tests)."""
        return [i for i in range(self.desc_num) if self.view[_HEADER.size + _ENTRY.size * i] == 1]


# -- packed virtqueues -----------------------------------------------------------------------
#
# Layout per queue (``QueueRegionPacked``): a header of features u64, version u16, desc_num u16,
# free_head u16, old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8,
# old_used_wrap_counter u8 and 7 bytes of padding, then ``desc_num`` entries of 32 bytes from
# offset 32 (``DescStatePacked``: inflight u8, padding u8, next u16, last u16, num u16,
# counter u64, id u16, flags u16, len u32, addr u64). Entries form a free list; a chain taken
# from the ring occupies one entry per ring descriptor, linked by ``next``, the head entry
# holding ``inflight``, ``counter``, ``num`` and ``last``. The ``old_*`` fields are the last
# committed state: a batch of used buffers in progress when the backend died is rolled back
# unless the ring shows it was published.

_P_HEADER_SIZE = 29  # the C struct's fields; the entries start at the next 8-byte boundary
_P_DESCS = 32
_P_ENTRY_SIZE = 32
_P_DESC = struct.Struct("<HHIQ")  # id, flags, len, addr of an entry (offset 16)
_RING_DESC = struct.Struct("<QIHH")  # a packed ring descriptor: addr, len, id, flags
# 16-bit word indices of the header fields, and byte offsets of the wrap counters.
_W_VERSION, _W_DESC_NUM, _W_FREE, _W_OLD_FREE, _W_USED, _W_OLD_USED = 4, 5, 6, 7, 8, 9
_B_WRAP, _B_OLD_WRAP = 20, 21
_F_AVAIL, _F_USED = 1 << 7, 1 << 15


def packed_region_size(queue_size: int) -> int:
    """Bytes one packed queue's region takes, 64-byte aligned (as DPDK sizes it)."""
    return (_P_HEADER_SIZE + _P_ENTRY_SIZE * queue_size + _ALIGN - 1) & ~(_ALIGN - 1)


Recovered = tuple[int, int, list[tuple[int, int, list[tuple[int, int, int, int]]]]]
"""What :meth:`PackedInflight.recover` finds: the used position and wrap counter, and for each
chain still in flight, oldest first, (buffer id, ring descriptors, [(addr, len, flags, id)])."""


class PackedInflight:
    """One packed queue's inflight region over a shared ``memoryview``.

    The queue calls :meth:`begin` for each chain it takes and :meth:`pre_put`,
    :meth:`set_used`, :meth:`post_put` around publishing used descriptors, always holding
    :attr:`lock`: the free list is shared by both sides, and a device may complete requests
    from other threads while it takes new ones.
    """

    __slots__ = ("_heads", "_w", "counter", "desc_num", "lock", "view")

    def __init__(self, view: memoryview, desc_num: int) -> None:
        if len(view) < packed_region_size(desc_num):
            raise QueueError(f"inflight region of {len(view)} bytes for {desc_num} descriptors")
        self.view = view[: packed_region_size(desc_num)]
        self._w = self.view.cast("H")
        self.desc_num = desc_num
        self.counter = 0
        self.lock = threading.Lock()
        #: Head entry of each buffer id in flight.
        self._heads: dict[int, int] = {}

    def _entry_word(self, entry: int, word: int) -> int:
        return (_P_DESCS + _P_ENTRY_SIZE * entry) // 2 + word

    def recover(
        self, ring16: memoryview, size: int, used_pos: int, used_wrap: int
    ) -> Recovered | None:
        """Prepare the region when the queue starts (the spec's "When reconnecting").

        A fresh region (version 0) is initialised with the queue's used position and wrap
        counter, and ``None`` returned. Otherwise a half-done batch of used descriptors is
        committed if the ring (``ring16``, the descriptor ring as 16-bit words) shows it
        published, else rolled back; the free list loses its in-flight marks; and the chains
        still in flight are returned, oldest first.
        """
        view, w, num = self.view, self._w, self.desc_num
        if w[_W_VERSION] == 0:
            view[:] = bytes(len(view))
            w[_W_VERSION] = INFLIGHT_VERSION
            w[_W_DESC_NUM] = num
            w[_W_USED] = w[_W_OLD_USED] = used_pos
            view[_B_WRAP] = view[_B_OLD_WRAP] = used_wrap
            for i in range(num):
                w[self._entry_word(i, 1)] = i + 1  # next: the free list runs through all
            self.counter = 0
            self._heads.clear()
            return None
        if w[_W_VERSION] != INFLIGHT_VERSION or w[_W_DESC_NUM] != num:
            raise QueueError(
                f"inflight region version {w[_W_VERSION]} for {w[_W_DESC_NUM]} descriptors"
            )
        old_used, old_wrap = w[_W_OLD_USED], view[_B_OLD_WRAP]
        if old_used >= size or old_wrap > 1:
            raise QueueError(f"inflight region's used position {old_used} in a ring of {size}")
        if (w[_W_USED], view[_B_WRAP]) != (old_used, old_wrap):
            # A batch was being returned. Published if the descriptor where it starts is no
            # longer the driver's available one: commit it; otherwise roll it back.
            available = _F_AVAIL if old_wrap else _F_USED
            if ring16[8 * old_used + 7] & (_F_AVAIL | _F_USED) != available:
                w[_W_OLD_FREE] = w[_W_FREE]
                w[_W_OLD_USED] = old_used = w[_W_USED]
                view[_B_OLD_WRAP] = old_wrap = view[_B_WRAP]
                if old_used >= size or old_wrap > 1:
                    raise QueueError(f"inflight used position {old_used} in a ring of {size}")
        w[_W_FREE] = w[_W_OLD_FREE]
        w[_W_USED] = old_used
        view[_B_WRAP] = old_wrap
        entry, steps = w[_W_FREE], 0
        while entry < num:
            if steps >= num:
                raise QueueError("inflight free list loops")
            view[_P_DESCS + _P_ENTRY_SIZE * entry] = 0
            entry = w[self._entry_word(entry, 1)]
            steps += 1
        pending: list[tuple[int, int]] = []
        top = -1
        for i in range(num):
            counter: int = _COUNTER.unpack_from(view, _P_DESCS + _P_ENTRY_SIZE * i + 8)[0]
            if view[_P_DESCS + _P_ENTRY_SIZE * i] == 1:
                pending.append((counter, i))
            top = max(top, counter)
        self.counter = top + 1
        pending.sort()
        self._heads.clear()
        chains: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
        for _, head in pending:
            count = w[self._entry_word(head, 3)]
            if not 1 <= count <= size:
                raise QueueError(f"inflight chain of {count} descriptors in a ring of {size}")
            descs: list[tuple[int, int, int, int]] = []
            entry = head
            for _ in range(count):
                if entry >= num:
                    raise QueueError(f"inflight chain reaches entry {entry} of {num}")
                bid, flags, length, addr = _P_DESC.unpack_from(
                    view, _P_DESCS + _P_ENTRY_SIZE * entry + 16
                )
                descs.append((addr, length, flags, bid))
                entry = w[self._entry_word(entry, 1)]
            bid = descs[-1][3]  # the buffer id is in the last descriptor (2.8.6)
            self._heads[bid] = head
            chains.append((bid, count, descs))
        return old_used, old_wrap, chains

    def begin(self, ring: memoryview, pos: int, count: int, size: int) -> None:
        """Record the chain of ``count`` ring descriptors from ``pos`` taken by the device."""
        view, w, num = self.view, self._w, self.desc_num
        head = w[_W_OLD_FREE]
        if head >= num:
            raise QueueError(f"inflight region of {num} entries is full")
        hw = self._entry_word(head, 0)
        w[hw + 3] = 0  # num
        _COUNTER.pack_into(view, _P_DESCS + _P_ENTRY_SIZE * head + 8, self.counter)
        self.counter += 1
        view[_P_DESCS + _P_ENTRY_SIZE * head] = 1
        free = w[_W_FREE]
        bid = 0
        for k in range(count):
            if free >= num:
                raise QueueError(f"inflight region of {num} entries is full")
            addr, length, bid, flags = _RING_DESC.unpack_from(ring, 16 * pos)
            if k == count - 1:
                w[hw + 2] = free  # last
            w[hw + 3] += 1
            _P_DESC.pack_into(view, _P_DESCS + _P_ENTRY_SIZE * free + 16, bid, flags, length, addr)
            free = w[self._entry_word(free, 1)]
            w[_W_FREE] = free
            pos = pos + 1 if pos + 1 < size else 0
        w[_W_OLD_FREE] = free
        self._heads[bid] = head

    def unbegin(self, bid: int) -> None:
        """Forget the last chain taken, buffer ``bid``: it goes back to the ring untouched."""
        head = self._heads.pop(bid, None)
        if head is None:
            return
        self.view[_P_DESCS + _P_ENTRY_SIZE * head] = 0
        self._w[_W_FREE] = self._w[_W_OLD_FREE] = head
        self.counter -= 1

    def pre_put(self, bids: list[int]) -> list[int]:
        """Give the entries of the buffers about to be returned back to the free list; return
        their head entries (for :meth:`post_put`). Unknown ids are skipped."""
        w = self._w
        heads = []
        for bid in bids:
            head = self._heads.pop(bid, None)
            if head is None:
                continue
            last = w[self._entry_word(head, 2)]
            w[self._entry_word(last, 1)] = w[_W_FREE]
            w[_W_FREE] = head
            heads.append(head)
        return heads

    def set_used(self, used_pos: int, used_wrap: int) -> None:
        """Record where the used side will be once the batch is published."""
        self._w[_W_USED] = used_pos
        self.view[_B_WRAP] = used_wrap

    def post_put(self, heads: list[int]) -> None:
        """The batch is published: clear its in-flight marks and commit the state."""
        view, w = self.view, self._w
        for head in heads:
            view[_P_DESCS + _P_ENTRY_SIZE * head] = 0
        w[_W_OLD_FREE] = w[_W_FREE]
        w[_W_OLD_USED] = w[_W_USED]
        view[_B_OLD_WRAP] = view[_B_WRAP]

    def in_flight(self) -> list[int]:
        """Buffer ids currently in flight (for stats and tests)."""
        return sorted(self._heads)
