"""Guest memory: regions shared by the frontend and zero-copy address translation.

A vhost-user frontend shares guest RAM as file descriptors (SET_MEM_TABLE, ADD_MEM_REG; QEMU
docs/interop/vhost-user.rst "Memory regions description"). Each region maps a guest-physical
range and the frontend's own virtual address range (used by SET_VRING_ADDR) onto an fd offset.
:class:`GuestMemory` translates either kind of address to a ``memoryview`` over the mapping and
refuses every range that is not entirely inside one region: straddling two regions, running
past the end, or wrapping around the 64-bit space.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
from bisect import bisect_right
from dataclasses import dataclass, field

from pvbus.virtio.errors import GuestMemoryError

#: Most regions one backend accepts (QEMU's VHOST_USER_MAX_RAM_SLOTS).
MAX_REGIONS = 509

_U64 = (1 << 64) - 1


@dataclass(eq=False, slots=True)
class MemoryRegion:
    """One region of guest memory and its mapping.

    ``buf`` is exactly ``size`` bytes long: the guest-physical range
    ``[gpa, gpa + size)`` and the frontend range ``[uaddr, uaddr + size)``.
    """

    gpa: int
    size: int
    uaddr: int
    buf: memoryview
    mmap_offset: int = 0
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def map_fd(cls, fd: int, gpa: int, size: int, uaddr: int, mmap_offset: int) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` from ``mmap_offset``, shared with the frontend.

        The mapping starts at the page that holds ``mmap_offset`` (mmap needs an aligned
        offset); the region's buffer starts at ``mmap_offset`` exactly.
        """
        _check_range(gpa, size, "guest address")
        _check_range(uaddr, size, "user address")
        if mmap_offset < 0 or mmap_offset > _U64 - size:
            raise GuestMemoryError(f"mmap offset {mmap_offset:#x} out of range")
        _check_backing(fd, mmap_offset + size)
        base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        lead = mmap_offset - base
        try:
            mapping = mmap.mmap(fd, lead + size, mmap.MAP_SHARED, offset=base)
        except (OSError, ValueError, OverflowError) as err:
            raise GuestMemoryError(f"cannot map region at {gpa:#x}+{size:#x}: {err}") from err
        buf = memoryview(mapping)[lead : lead + size]
        return cls(gpa, size, uaddr, buf, mmap_offset, mapping)

    @classmethod
    def from_buffer(
        cls, gpa: int, buf: bytearray | memoryview, uaddr: int | None = None
    ) -> MemoryRegion:
        """A region over an existing writable buffer (tests, the mock driver)."""
        view = memoryview(buf).cast("B")
        _check_range(gpa, len(view), "guest address")
        return cls(gpa, len(view), gpa if uaddr is None else uaddr, view)

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.gpa + self.size

    def close(self) -> None:
        """Release the buffer and unmap (the mapping stays while views of it live)."""
        self.buf.release()
        if self._mapping is not None:
            # If someone still holds a view, the mapping goes when that view is collected.
            with contextlib.suppress(BufferError):
                self._mapping.close()
            self._mapping = None


def _check_backing(fd: int, end: int) -> None:
    """Refuse a file too small for the mapping, and seal a memfd against shrinking.

    Touching a mapped page past the end of its file raises SIGBUS, which no Python code can
    catch: a region must lie inside its file, and stay so. QEMU seals its memfds itself;
    for others pvbus adds F_SEAL_SHRINK where the memfd allows sealing.
    """
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise GuestMemoryError(f"region fd {fd}: {err.strerror}") from err
    if stat.S_ISREG(st.st_mode):
        if st.st_size < end:
            raise GuestMemoryError(f"region ends at {end:#x} past its file's {st.st_size:#x} bytes")
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)


def _check_range(start: int, size: int, what: str) -> None:
    if size <= 0 or start < 0 or start > _U64 or size > _U64 - start + 1:
        raise GuestMemoryError(f"bad {what} range {start:#x}+{size:#x}")


class GuestMemory:
    """A set of non-overlapping :class:`MemoryRegion` s, looked up by address.

    Lookups cache the last region hit, since a request's buffers usually sit in one region.
    """

    __slots__ = ("_by_uaddr", "_last", "_starts", "_uaddr_starts", "regions", "table")

    def __init__(self, regions: list[MemoryRegion] | None = None) -> None:
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._by_uaddr: list[MemoryRegion] = []
        self._uaddr_starts: list[int] = []
        self._last: MemoryRegion | None = None
        #: ``(gpa, size, buf)`` of each region, for the C ring loop (``pvbus.virtio._fastring``).
        self.table: tuple[tuple[int, int, memoryview], ...] = ()
        for region in regions or ():
            self.add(region)

    def __len__(self) -> int:
        return len(self.regions)

    def add(self, region: MemoryRegion) -> None:
        """Add a region; refuses overlap with an existing one, in either address space."""
        if len(self.regions) >= MAX_REGIONS:
            raise GuestMemoryError(f"more than {MAX_REGIONS} memory regions")
        for other in self.regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps"
                    f" {other.gpa:#x}+{other.size:#x}"
                )
            if region.uaddr < other.uaddr + other.size and other.uaddr < region.uaddr + region.size:
                raise GuestMemoryError(f"region user address {region.uaddr:#x} overlaps another")
        self.regions.append(region)
        self._reindex()

    def remove(self, gpa: int, size: int, uaddr: int) -> MemoryRegion:
        """Remove and return the region that matches exactly (REM_MEM_REG); the caller closes it."""
        for region in self.regions:
            if region.gpa == gpa and region.size == size and region.uaddr == uaddr:
                self.regions.remove(region)
                self._reindex()
                return region
        raise GuestMemoryError(f"no region {gpa:#x}+{size:#x} to remove")

    def close(self) -> None:
        """Unmap every region."""
        for region in self.regions:
            region.close()
        self.regions.clear()
        self._reindex()

    def _reindex(self) -> None:
        self.regions.sort(key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.regions]
        self._by_uaddr = sorted(self.regions, key=lambda r: r.uaddr)
        self._uaddr_starts = [r.uaddr for r in self._by_uaddr]
        self._last = None
        self.table = tuple((r.gpa, r.size, r.buf) for r in self.regions)

    def region_of(self, gpa: int) -> MemoryRegion:
        """The region that holds guest-physical address ``gpa``."""
        last = self._last
        if last is not None and last.gpa <= gpa < last.gpa + last.size:
            return last
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self.regions[i]
            if gpa < region.gpa + region.size:
                self._last = region
                return region
        raise GuestMemoryError(f"guest address {gpa:#x} is not in guest memory")

    def translate(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at guest-physical ``gpa``, all in one region."""
        last = self._last
        if last is not None and last.gpa <= gpa and 0 <= length <= last.gpa + last.size - gpa:
            off = gpa - last.gpa
            return last.buf[off : off + length]
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        region = self.region_of(gpa)
        off = gpa - region.gpa
        if length > region.size - off:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} runs past its region's end {region.end:#x}"
            )
        return region.buf[off : off + length]

    def uaddr_to_gpa(self, uaddr: int, length: int = 1) -> int:
        """Convert a frontend virtual address (SET_VRING_ADDR) to guest-physical."""
        i = bisect_right(self._uaddr_starts, uaddr) - 1
        if i >= 0:
            region = self._by_uaddr[i]
            off = uaddr - region.uaddr
            if off < region.size and length <= region.size - off:
                return region.gpa + off
        raise GuestMemoryError(f"user address {uaddr:#x}+{length:#x} is not in guest memory")
