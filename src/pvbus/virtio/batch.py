"""Frame batches: many frames in one ``bytes``, for a consumer that keeps frames.

A backend that holds frames after their transmit chains are returned (a loopback, a queue
in front of a slow peer) needs copies. One ``bytes`` object per frame costs an allocation, a
free and a Python object per frame; a :class:`FrameBatch` is a whole burst in two objects:
the frames back to back and their end offsets. :meth:`SplitQueue.pop_batch
<pvbus.virtio.split.SplitQueue.pop_batch>` makes one from a transmit ring and
:meth:`~pvbus.virtio.split.SplitQueue.fill_batch` copies one into receive buffers, both in C
where ``pvbus.virtio._fastring`` is built.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence

__all__ = ["BATCH_BYTES", "FrameBatch"]

Chunk = bytes | bytearray | memoryview

#: Size of the buffers a batch is copied into: below glibc's mmap threshold (128 KiB), so a
#: buffer comes from the heap, and small enough to stay in cache between its two copies.
BATCH_BYTES = 64 << 10


class FrameBatch:
    """Frames back to back in :attr:`data`; frame ``i`` ends at ``ends[i]`` (native uint32).

    ``data`` may be a recycled ``bytearray`` longer than the frames: whoever keeps the batch
    owns it, and hands it back to its pool once the frames are taken.
    """

    __slots__ = ("_ends", "data", "ends")

    def __init__(self, data: bytes | bytearray, ends: bytes) -> None:
        view = memoryview(ends).cast("I")
        if len(view) and view[-1] > len(data):
            raise ValueError("frame ends past the data")
        self.data = data
        #: End offsets as bytes (what the C loops take).
        self.ends = ends
        self._ends = view

    @classmethod
    def of(cls, frames: Sequence[Chunk]) -> FrameBatch:
        """A batch holding copies of ``frames``."""
        ends = array.array("I", itertools.accumulate(map(len, frames)))
        return cls(b"".join(frames), ends.tobytes())

    @classmethod
    def into(cls, buffer: bytearray, frames: Sequence[Chunk]) -> FrameBatch:
        """A batch of ``frames`` copied back to back into ``buffer`` (they must fit)."""
        ends = array.array("I")
        pos = 0
        for frame in frames:
            buffer[pos : pos + len(frame)] = frame
            pos += len(frame)
            ends.append(pos)
        return cls(buffer, ends.tobytes())

    def __len__(self) -> int:
        return len(self._ends)

    def offset(self, index: int) -> int:
        """Where frame ``index`` starts (the total size for ``index == len(self)``)."""
        return self._ends[index - 1] if index else 0

    def frame(self, index: int) -> bytes:
        """A copy of frame ``index``."""
        return bytes(self.data[self.offset(index) : self._ends[index]])

    def frames(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Copies of frames ``start`` to ``stop``."""
        return [self.frame(i) for i in range(start, len(self) if stop is None else stop)]

    def head(self, count: int) -> FrameBatch:
        """The first ``count`` frames as a batch of their own, on the same data (no copy: a
        recycled buffer stays one)."""
        if count >= len(self):
            return self
        return FrameBatch(self.data, self.ends[: 4 * count])
