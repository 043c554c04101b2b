"""A full memory barrier for rings shared with another process (Linux's ``virtio_mb``).

Notification suppression (VIRTIO 1.2 section 2.7.10) has each side store one index, then load
the other side's: the device writes avail_event and re-reads the available index, the driver
writes the available index and reads avail_event (likewise used index / used_event). Without a
full barrier between the store and the load both sides can miss each other and a kick or an
interrupt is lost: even x86 lets a store wait in the store buffer while a later load runs.
CPython has no fence; acquiring and releasing an uncontended lock executes an atomic
read-modify-write (a ``lock``-prefixed instruction on x86), which orders them.
"""

from __future__ import annotations

import threading

_fence = threading.Lock()
_acquire = _fence.acquire
_release = _fence.release


def full_barrier() -> None:
    """Order every store before this call ahead of every load after it."""
    _acquire()
    _release()
