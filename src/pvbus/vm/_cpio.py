"""A tiny writer for the ``newc`` cpio format that Linux unpacks as an initramfs.

Entries are written in order with mtime 0 and fixed owners, so the same input gives the same
bytes. Linux accepts several archives concatenated (compressed or not), which is how a per-run
command is appended to a cached base image.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

__all__ = ["CpioWriter"]

_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


@dataclass
class CpioWriter:
    """Accumulates entries; :meth:`finish` returns the archive bytes."""

    _chunks: list[bytes] = field(default_factory=list)
    _ino: int = 1
    _size: int = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.lstrip("/").encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(name_b),
            0,  # check
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        chunk = header + name_b
        chunk += _pad4(len(chunk)) + data + _pad4(len(data))
        self._chunks.append(chunk)
        self._size += len(chunk)

    def directory(self, name: str, perm: int = 0o755) -> None:
        """Add a directory (parents must be added first)."""
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive, with its trailer, padded to 512 bytes."""
        self._entry(_TRAILER, 0)
        data = b"".join(self._chunks)
        return data + b"\0" * (-len(data) % 512)
