"""Errors of the virtio layer, raised for what the driver (the guest) got wrong."""

from __future__ import annotations


class VirtioError(Exception):
    """Base class: the driver broke a rule of the virtio spec."""


class GuestMemoryError(VirtioError):
    """An address range is not entirely inside one guest memory region."""


class QueueError(VirtioError):
    """A virtqueue is malformed beyond what a device can answer with a status.

    The device sets DEVICE_NEEDS_RESET (VIRTIO 1.2 section 2.1.2) and stops the queue.
    """
