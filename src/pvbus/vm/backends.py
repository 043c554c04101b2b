"""vhost-user-blk backend processes, one per disk: pvbus's own or qemu-storage-daemon.

A backend kind is a function from (disk, socket path) to an argv; :func:`start_backend` runs
it and waits until the listening socket appears. ``qsd`` is the reference implementation to
compare pvbus against (and to develop the runner without it).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pvbus.vm._process import BackendError, ServeProcess, spawn_serving
from pvbus.vm.qemu import DiskSpec

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendArgv",
    "BackendError",
    "pvbus_blk_argv",
    "qsd_blk_argv",
    "start_backend",
]

#: QEMU's VIRTQUEUE_MAX_SIZE: the largest ring a guest may set up.
MAX_QUEUE_SIZE = 1024

BackendArgv = Callable[[DiskSpec, Path], list[str]]


def pvbus_blk_argv(disk: DiskSpec, socket_path: Path) -> list[str]:
    """``pvbus serve blk`` in this interpreter."""
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "blk"]
    argv += ["--socket-path", str(socket_path), "--image", str(disk.path)]
    if disk.read_only:
        argv.append("--read-only")
    # virtio-mmio offers the guest QEMU's VIRTQUEUE_MAX_SIZE (1024) whatever the device's
    # queue-size, so the backend must accept rings that large.
    argv += ["--num-queues", str(disk.num_queues), "--queue-size", str(MAX_QUEUE_SIZE)]
    return argv


def qsd_blk_argv(disk: DiskSpec, socket_path: Path) -> list[str]:
    """``qemu-storage-daemon`` exporting the image as vhost-user-blk."""
    writable = "off" if disk.read_only else "on"
    ro = "on" if disk.read_only else "off"
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file0,filename={disk.path},read-only={ro}",
        "--export",
        "type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
        f"addr.path={socket_path},writable={writable},num-queues={disk.num_queues}",
    ]


BACKENDS: dict[str, BackendArgv] = {"pvbus": pvbus_blk_argv, "qsd": qsd_blk_argv}


@dataclass
class Backend(ServeProcess):
    """A running disk backend."""

    disk: DiskSpec = field(kw_only=True)


def start_backend(
    kind: str | BackendArgv,
    disk: DiskSpec,
    socket_path: Path,
    log_path: Path,
    *,
    timeout: float = 15.0,
) -> Backend:
    """Start a backend of ``kind`` for ``disk`` and wait for ``socket_path`` to listen."""
    make_argv = BACKENDS[kind] if isinstance(kind, str) else kind
    argv = make_argv(disk, socket_path)
    if os.sep not in argv[0] and shutil.which(argv[0]) is None:
        raise BackendError(f"{argv[0]} not found")
    if not disk.path.exists():
        raise BackendError(f"disk image {disk.path} does not exist")
    what = f"{Path(argv[0]).name} backend for {disk.path}"
    proc = spawn_serving(argv, socket_path, log_path, what, timeout)
    return Backend(socket_path, proc, log_path, disk=disk)
