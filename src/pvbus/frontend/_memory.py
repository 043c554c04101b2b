"""Guest memory a frontend owns: one memfd, mapped here and shared with the backend.

The region is handed over with SET_MEM_TABLE (vhost-user.rst "Memory region description"):
guest-physical address 0 upwards, the frontend's real virtual address of the mapping as
``userspace_addr`` (the address rings are given in, SET_VRING_ADDR), offset 0 in the fd.
A first-fit allocator hands out aligned pieces for rings, request headers and data buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from bisect import insort
from dataclasses import dataclass

from pvbus.vhost_user.messages import Region
from pvbus.virtio.memory import GuestMemory, MemoryRegion

PAGE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class GuestBuffer:
    """A piece of guest memory: its guest-physical address and a writable view of it."""

    gpa: int
    view: memoryview

    def __len__(self) -> int:
        return len(self.view)


class OutOfGuestMemoryError(MemoryError):
    """The frontend's guest memory has no free piece that large."""


class MemfdMemory:
    """``size`` bytes of memfd-backed guest memory at guest-physical ``base``."""

    def __init__(self, size: int, *, base: int = 0, name: str = "pvbus-guest") -> None:
        size = (size + PAGE - 1) // PAGE * PAGE
        if size <= 0:
            raise ValueError("guest memory size must be positive")
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        probe = ctypes.c_char.from_buffer(self._mapping)
        self.uaddr = ctypes.addressof(probe)
        del probe
        self.size = size
        self.base = base
        self.region = MemoryRegion(base, size, self.uaddr, memoryview(self._mapping))
        self.mem = GuestMemory([self.region])
        # Free list of (gpa, size), sorted by address; neighbours are merged on free.
        self._free: list[tuple[int, int]] = [(base, size)]
        self._used: dict[int, int] = {}

    def table_region(self) -> Region:
        """This memory as a SET_MEM_TABLE / ADD_MEM_REG region."""
        return Region(self.base, self.size, self.uaddr, 0)

    def gpa_to_uaddr(self, gpa: int) -> int:
        """The frontend virtual address of guest-physical ``gpa`` (for SET_VRING_ADDR)."""
        return self.uaddr + (gpa - self.base)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``gpa``."""
        return self.mem.translate(gpa, length)

    # -- allocation -------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 64) -> GuestBuffer:
        """A free piece of ``size`` bytes aligned to ``align`` (a power of two)."""
        if size <= 0:
            raise ValueError(f"allocation of {size} bytes")
        for i, (start, length) in enumerate(self._free):
            addr = (start + align - 1) & ~(align - 1)
            if addr + size > start + length:
                continue
            del self._free[i]
            if addr > start:
                insort(self._free, (start, addr - start))
            if addr + size < start + length:
                insort(self._free, (addr + size, start + length - addr - size))
            self._used[addr] = size
            return GuestBuffer(addr, self.mem.translate(addr, size))
        raise OutOfGuestMemoryError(f"no free {size} bytes in {self.size} bytes of guest memory")

    def free(self, buf: GuestBuffer | int) -> None:
        """Give a piece back."""
        addr = buf if isinstance(buf, int) else buf.gpa
        size = self._used.pop(addr, None)
        if size is None:
            raise ValueError(f"{addr:#x} is not allocated")
        insort(self._free, (addr, size))
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def close(self) -> None:
        """Unmap and close the memfd (the backend keeps its own mapping until it unmaps)."""
        if self.fd < 0:
            return
        self.mem.close()
        # Views handed out keep the mapping alive until they are collected.
        with contextlib.suppress(BufferError):
            self._mapping.close()
        os.close(self.fd)
        self.fd = -1
