"""The split ring's hot loop in C (see _fastring.c and pvbus.virtio.split)."""

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
