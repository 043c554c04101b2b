"""The rings' hot loops in C (see _fastring.c, pvbus.virtio.split and pvbus.virtio.packed)."""

from typing import Any

Buffer = bytes | bytearray | memoryview

def pop_frames(
    desc: Buffer,
    avail: Buffer,
    size: int,
    next_avail: int,
    limit: int,
    want: int,
    regions: tuple[tuple[int, int, memoryview], ...],
    skip: int,
    min_len: int,
    max_len: int,
    zero_prefix: int,
    /,
) -> tuple[list[memoryview], bytes, int]: ...
def pop_batch(
    desc: Buffer,
    avail: Buffer,
    size: int,
    next_avail: int,
    limit: int,
    want: int,
    regions: tuple[tuple[int, int, memoryview], ...],
    skip: int,
    min_len: int,
    max_len: int,
    zero_prefix: int,
    into: bytearray,
    /,
) -> tuple[bytes, bytes, int]: ...
def fill_batch(
    desc: Buffer,
    avail: Buffer,
    used: Buffer,
    size: int,
    next_avail: int,
    next_used: int,
    regions: tuple[tuple[int, int, memoryview], ...],
    data: Buffer,
    ends: Buffer,
    start: int,
    prefix: Buffer,
    /,
) -> tuple[int, int, int]: ...
def publish_used(used: Buffer, size: int, next_used: int, heads: Buffer, length: int, /) -> int: ...
def packed_pop(
    ring: Buffer,
    size: int,
    pos: int,
    bits: int,
    limit: int,
    want: int,
    regions: tuple[tuple[int, int, memoryview], ...],
    skip: int,
    min_len: int,
    max_len: int,
    zero_prefix: int,
    into: bytearray | None = None,
    /,
) -> tuple[Any, bytes, int, int]: ...
def packed_fill(
    ring: Buffer,
    size: int,
    pos: int,
    bits: int,
    used_pos: int,
    used_wrap: int,
    regions: tuple[tuple[int, int, memoryview], ...],
    data: Buffer,
    ends: Buffer,
    start: int,
    prefix: Buffer,
    /,
) -> tuple[int, int, int, int, int]: ...
def packed_publish(
    ring: Buffer, size: int, used_pos: int, used_wrap: int, ids: Buffer, length: int, /
) -> tuple[int, int]: ...
