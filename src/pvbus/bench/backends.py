"""Backends the benchmark starts itself: ``pvbus serve blk`` or qemu-storage-daemon.

Reuses the launchers of :mod:`pvbus.vm.backends`, in a private temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pvbus.vm.backends import Backend, start_backend
from pvbus.vm.qemu import DiskSpec


@contextmanager
def managed_backend(kind: str, image: Path, *, num_queues: int = 1) -> Iterator[Backend]:
    """Run backend ``kind`` ("pvbus" or "qsd") on ``image`` for the ``with`` block."""
    with tempfile.TemporaryDirectory(prefix="pvbus-bench-") as tmp:
        disk = DiskSpec(image, read_only=False, num_queues=num_queues)
        backend = start_backend(kind, disk, Path(tmp) / f"{kind}.sock", Path(tmp) / f"{kind}.log")
        try:
            yield backend
        finally:
            backend.stop()
