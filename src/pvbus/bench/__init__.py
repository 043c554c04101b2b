"""Benchmarks of vhost-user backends through the userspace frontend.

:func:`run_blk` keeps a queue depth of block requests in flight and measures IOPS, latency,
notifications per request and the backend's CPU per request; :func:`eventfd_pingpong` and
:func:`backend_roundtrip` compare a kick-to-call round trip with the bare eventfd floor;
:func:`managed_backend` starts pvbus or qemu-storage-daemon on an image for a run.
"""

from pvbus.bench.backends import managed_backend
from pvbus.bench.blk import BlkJob, BlkResult, cpu_seconds, parse_size, run_blk
from pvbus.bench.notify import NotifyResult, backend_roundtrip, eventfd_pingpong

__all__ = [
    "BlkJob",
    "BlkResult",
    "NotifyResult",
    "backend_roundtrip",
    "cpu_seconds",
    "eventfd_pingpong",
    "managed_backend",
    "parse_size",
    "run_blk",
]
