"""vhost-user-blk backend processes, one per disk: pvbus's own or qemu-storage-daemon.

A backend kind is a function from (disk, socket path) to an argv; :func:`start_backend` runs
it and waits until the listening socket appears. ``qsd`` is the reference implementation to
compare pvbus against (and to develop the runner without it).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


class BackendError(Exception):
    """A backend could not be started or did not create its socket."""


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


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Backend:
    """A running backend: its socket, process and log file."""

    disk: DiskSpec
    socket_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the backend printed."""
        return _tail(self.log_path, lines)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


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
    socket_path.unlink(missing_ok=True)
    with log_path.open("ab") as log:  # a restarted backend appends to its log
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    backend = Backend(disk, socket_path, proc, log_path)
    deadline = time.monotonic() + timeout
    while not _is_socket(socket_path):
        if proc.poll() is not None:
            tail = backend.log_tail(1)
            raise BackendError(
                f"{Path(argv[0]).name} backend for {disk.path} exited ({proc.returncode}): {tail}"
            )
        if time.monotonic() > deadline:
            backend.stop()
            raise BackendError(f"backend for {disk.path} did not create {socket_path}")
        time.sleep(0.02)
    return backend
