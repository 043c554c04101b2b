"""virtio-blk wire format (VIRTIO 1.2 section 5.2), shared by the device and the driver.

Feature bits (5.2.3), the request header and discard/write-zeroes segment (5.2.6), request
types and status values. The config space layout lives with the device model.
"""

from __future__ import annotations

import struct
from enum import IntEnum

SECTOR = 512
#: Bytes of a GET_ID answer.
ID_BYTES = 20

# Feature bits (section 5.2.3).
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14


class RequestType(IntEnum):
    """Request types (section 5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class Status(IntEnum):
    """Request status values (section 5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: struct virtio_blk_req's header: type, reserved, sector.
HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
SEGMENT = struct.Struct("<QII")
WRITE_ZEROES_UNMAP = 1
