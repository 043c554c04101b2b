"""Inflight descriptor tracking for split virtqueues (vhost-user.rst "Inflight I/O tracking").

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
