"""Byte-level views of a chain's buffers: a device reads a header that the driver may have
split across descriptors (VIRTIO 1.2 section 2.7.4.1: no framing is implied)."""

from __future__ import annotations

from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import Buffer


def gather(bufs: list[Buffer], length: int, mem: GuestMemory) -> bytes | None:
    """A copy of the first ``length`` bytes of ``bufs`` (None if they hold fewer).

    Raises :class:`~pvbus.virtio.GuestMemoryError` for a buffer outside guest memory.
    """
    out = bytearray()
    for addr, n in bufs:
        if len(out) == length:
            break
        out += mem.translate(addr, min(n, length - len(out)))
    return bytes(out) if len(out) == length else None


def skip(bufs: list[Buffer], length: int) -> list[Buffer]:
    """``bufs`` without their first ``length`` bytes."""
    out: list[Buffer] = []
    for addr, n in bufs:
        if length >= n:
            length -= n
            continue
        out.append((addr + length, n - length))
        length = 0
    return out
