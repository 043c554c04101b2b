"""Constants of the VIRTIO 1.2 specification, with the sections that define them."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class DeviceStatus(IntFlag):
    """Device status field (section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(IntEnum):
    """Device types (section 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    SCSI = 8
    GPU = 16
    INPUT = 18
    VSOCK = 19
    FS = 26
    SOUND = 25


# Reserved feature bits (section 6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40

# Split virtqueue descriptor flags (section 2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Available ring flags (section 2.7.6) and used ring flags (section 2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Packed virtqueue descriptor flags beside NEXT, WRITE and INDIRECT (section 2.8.1).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
# Event suppression flags of a packed virtqueue (section 2.8.10); DESC needs EVENT_IDX.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

#: Largest queue size a split virtqueue may have (section 2.7).
MAX_QUEUE_SIZE = 32768
#: Largest queue size a packed virtqueue may have (section 2.8: up to 2**15, any value).
MAX_PACKED_QUEUE_SIZE = 32768


def bit(n: int) -> int:
    """The feature mask of feature bit ``n``."""
    return 1 << n
