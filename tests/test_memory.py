"""Guest memory: memfd-mapped regions and address translation (vhost-user.rst memory regions)."""

from __future__ import annotations

import mmap
import os

import pytest

from conftest import memfd
from pvbus.virtio.errors import GuestMemoryError
from pvbus.virtio.memory import MAX_REGIONS, GuestMemory, MemoryRegion

PAGE = mmap.PAGESIZE
TOP = 1 << 64


def test_map_fd_shares_memory_with_the_frontend() -> None:
    fd = memfd(4 * PAGE)
    try:
        region = MemoryRegion.map_fd(
            fd, gpa=0x100000, size=2 * PAGE, uaddr=0x7F00_0000, mmap_offset=PAGE
        )
        mem = GuestMemory([region])
        mem.translate(0x100000 + 10, 5)[:] = b"hello"
        assert os.pread(fd, 5, PAGE + 10) == b"hello"
        os.pwrite(fd, b"world", PAGE + 2 * PAGE - 5)
        assert bytes(mem.translate(0x100000 + 2 * PAGE - 5, 5)) == b"world"
        mem.close()
    finally:
        os.close(fd)


def test_map_fd_unaligned_offset_starts_exactly_there() -> None:
    fd = memfd(3 * PAGE)
    try:
        os.pwrite(fd, b"ABCD", PAGE + 100)
        region = MemoryRegion.map_fd(fd, 0, PAGE, 0, PAGE + 100)
        assert bytes(region.buf[:4]) == b"ABCD"
        assert len(region.buf) == PAGE
        region.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("gpa", "size", "uaddr", "offset", "file_size"),
    [
        (0, 0, 0, 0, PAGE),  # empty region
        (0, 2 * PAGE, 0, 0, PAGE),  # runs past the end of the file (would SIGBUS)
        (0, PAGE, 0, PAGE, PAGE),  # offset at the end of the file
        (TOP - PAGE, 2 * PAGE, 0, 0, 2 * PAGE),  # guest range wraps around 2^64
        (0, 2 * PAGE, TOP - PAGE, 0, 2 * PAGE),  # user range wraps around 2^64
        (0, PAGE, 0, TOP - 1, PAGE),  # offset wraps
        (-PAGE, PAGE, 0, 0, PAGE),
    ],
)
def test_map_fd_refuses_bad_regions(
    gpa: int, size: int, uaddr: int, offset: int, file_size: int
) -> None:
    fd = memfd(file_size)
    try:
        with pytest.raises(GuestMemoryError):
            MemoryRegion.map_fd(fd, gpa, size, uaddr, offset)
    finally:
        os.close(fd)


def test_map_fd_bad_fd() -> None:
    fd = memfd(PAGE)
    os.close(fd)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.map_fd(fd, 0, PAGE, 0, 0)


def two_adjacent() -> tuple[GuestMemory, bytearray, bytearray]:
    low, high = bytearray(PAGE), bytearray(PAGE)
    mem = GuestMemory(
        [
            MemoryRegion.from_buffer(0x10000, low, uaddr=0x7000_0000),
            MemoryRegion.from_buffer(0x10000 + PAGE, high, uaddr=0x5000_0000),
        ]
    )
    return mem, low, high


def test_translate_inside_each_region() -> None:
    mem, low, high = two_adjacent()
    mem.translate(0x10000, PAGE)[:] = b"a" * PAGE
    mem.translate(0x10000 + PAGE, 1)[:] = b"b"
    mem.translate(0x10000 + 2 * PAGE - 1, 1)[:] = b"c"
    assert low == b"a" * PAGE
    assert high[0:1] == b"b"
    assert high[-1:] == b"c"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x10000 - 1, 2),  # starts before the first region
        (0x10000 - 1, 1),
        (0x10000 + PAGE - 1, 2),  # straddles the two adjacent regions
        (0x10000, PAGE + 1),
        (0x10000 + 2 * PAGE - 1, 2),  # runs past the end
        (0x10000 + 2 * PAGE, 1),
        (0, 1),
        (TOP - 1, 2),  # wraps around 2^64
        (TOP - 1, TOP),
        (0x10000 + PAGE, TOP - 0x10000),
        (0x10000, -1),
        (-1, 2),
    ],
)
def test_translate_refuses_ranges_outside_one_region(gpa: int, length: int) -> None:
    mem, _, _ = two_adjacent()
    # Twice: once cold, once with the last-hit cache pointing at a neighbouring region.
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    mem.translate(0x10000 + PAGE, 1)
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    mem.translate(0x10000, 1)
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)


def test_region_at_the_top_of_the_address_space() -> None:
    buf = bytearray(PAGE)
    mem = GuestMemory([MemoryRegion.from_buffer(TOP - PAGE, buf)])
    mem.translate(TOP - 1, 1)[:] = b"z"
    assert buf[-1:] == b"z"
    for gpa, length in [(TOP - 1, 2), (TOP - PAGE, PAGE + 1), (TOP, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.translate(gpa, length)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_buffer(TOP - PAGE + 1, bytearray(PAGE))


def test_overlapping_regions_refused() -> None:
    mem, _, _ = two_adjacent()
    with pytest.raises(GuestMemoryError):
        mem.add(MemoryRegion.from_buffer(0x10000 + PAGE - 1, bytearray(2), uaddr=0x9000_0000))
    with pytest.raises(GuestMemoryError, match="user address"):
        mem.add(MemoryRegion.from_buffer(0x90000, bytearray(16), uaddr=0x7000_0000 + PAGE - 1))
    assert len(mem) == 2


def test_uaddr_to_gpa() -> None:
    mem, _, _ = two_adjacent()
    assert mem.uaddr_to_gpa(0x7000_0000) == 0x10000
    assert mem.uaddr_to_gpa(0x7000_0000 + 100, PAGE - 100) == 0x10000 + 100
    assert mem.uaddr_to_gpa(0x5000_0000 + 8, 8) == 0x10000 + PAGE + 8
    for uaddr, length in [
        (0x7000_0000 - 1, 1),
        (0x7000_0000 + PAGE - 1, 2),  # past the region's end
        (0x5000_0000 + PAGE, 1),
        (0x6000_0000, 1),  # between the two
        (TOP - 1, 2),
    ]:
        with pytest.raises(GuestMemoryError):
            mem.uaddr_to_gpa(uaddr, length)


def test_up_to_509_regions_and_the_510th_refused() -> None:
    fd = memfd((MAX_REGIONS + 1) * PAGE)
    try:
        mem = GuestMemory()
        for i in range(MAX_REGIONS):
            mem.add(MemoryRegion.map_fd(fd, 2 * i * PAGE, PAGE, 0x4000_0000 + i * PAGE, i * PAGE))
        assert MAX_REGIONS == 509
        assert len(mem) == MAX_REGIONS
        extra = MemoryRegion.map_fd(fd, 2 * MAX_REGIONS * PAGE, PAGE, 0x1000, MAX_REGIONS * PAGE)
        with pytest.raises(GuestMemoryError):
            mem.add(extra)
        extra.close()
        # Every region translates to its own page of the memfd; the holes between them do not.
        mem.translate(2 * 300 * PAGE, 3)[:] = b"300"
        assert os.pread(fd, 3, 300 * PAGE) == b"300"
        with pytest.raises(GuestMemoryError):
            mem.translate(2 * 300 * PAGE + PAGE, 1)
        assert mem.uaddr_to_gpa(0x4000_0000 + 508 * PAGE + 5) == 2 * 508 * PAGE + 5
        mem.close()
        assert len(mem) == 0
    finally:
        os.close(fd)


def test_remove_region() -> None:
    mem, _, _ = two_adjacent()
    with pytest.raises(GuestMemoryError):
        mem.remove(0x10000, PAGE, 0x1234)  # uaddr differs
    mem.translate(0x10000 + PAGE, 1)  # cache the region about to go
    removed = mem.remove(0x10000 + PAGE, PAGE, 0x5000_0000)
    assert removed.gpa == 0x10000 + PAGE
    with pytest.raises(GuestMemoryError):
        mem.translate(0x10000 + PAGE, 1)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_to_gpa(0x5000_0000)
    assert len(mem.translate(0x10000, PAGE)) == PAGE


def test_close_unmaps() -> None:
    fd = memfd(PAGE)
    try:
        region = MemoryRegion.map_fd(fd, 0, PAGE, 0, 0)
        mem = GuestMemory([region])
        mem.close()
        with pytest.raises(ValueError):
            region.buf[0]
        with pytest.raises(GuestMemoryError):
            mem.translate(0, 1)
    finally:
        os.close(fd)
