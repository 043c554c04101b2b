"""vhost-user wire messages (QEMU docs/interop/vhost-user.rst, "Message types").

Every message is a 12-byte header (request, flags, size) and a payload of one of the spec's
payload kinds. The kinds are frozen, slotted dataclasses validated when built or unpacked; the
table :data:`PAYLOADS` says which kind each request carries in each direction, and how many file
descriptors come with it. This module does no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Protocol, Self

from pvbus.vhost_user.errors import RemoteProtocolError

HEADER = struct.Struct("<III")
#: Largest payload accepted (the biggest spec payload is a config space of 256 bytes plus 12,
#: or a memory table of 8 regions; anything near this is garbage).
MAX_PAYLOAD = 4096
#: Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_TABLE_REGIONS = 8
#: Largest device config space (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Bit 30 of GET_FEATURES: the backend speaks protocol features.
F_PROTOCOL_FEATURES = 30


class Request(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    """Protocol feature bits (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Flags(IntFlag):
    """Header flags: version 1 in bits 0-1, REPLY (bit 2), NEED_REPLY (bit 3)."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


#: SET_VRING_KICK/CALL/ERR: bits 0-7 are the queue index, bit 8 says "no fd" (polling).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Payload(Protocol):
    """A payload kind: packs to bytes and unpacks from exactly its bytes."""

    def pack(self) -> bytes: ...

    @classmethod
    def unpack(cls, data: bytes) -> Self: ...


def _fits(s: struct.Struct, *values: int) -> None:
    """Refuse field values the wire format cannot carry (negative, or too wide)."""
    try:
        s.pack(*values)
    except struct.error as err:
        raise ValueError(f"field out of range: {err}") from err


def _exact(cls_name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise RemoteProtocolError(f"{cls_name} payload of {len(data)} bytes, expected {size}")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _exact("empty", data, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer."""

    value: int
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        if not 0 <= self.value < 1 << 64:
            raise ValueError(f"u64 out of range: {self.value}")

    def pack(self) -> bytes:
        return self._S.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        _exact("u64", data, 8)
        return cls(cls._S.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class VringState:
    """A vring state description: queue index and a number (size, base or enable)."""

    index: int
    num: int
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        _fits(self._S, self.index, self.num)

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        _exact("vring state", data, 8)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """A vring address description, in the frontend's virtual address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def __post_init__(self) -> None:
        _fits(self._S, self.index, self.flags, self.desc, self.used, self.avail, self.log)

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        _exact("vring address", data, cls._S.size)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class Region:
    """One memory region: guest address, size, frontend address, offset into its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def __post_init__(self) -> None:
        _fits(
            self._S, self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    def pack(self) -> bytes:
        return self._S.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@dataclass(frozen=True, slots=True)
class MemTable:
    """A memory regions description (SET_MEM_TABLE): up to 8 regions, one fd each."""

    regions: tuple[Region, ...]
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_TABLE_REGIONS:
            raise ValueError(f"{len(self.regions)} regions in one memory table")

    def pack(self) -> bytes:
        return self._S.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        if len(data) < 8:
            raise RemoteProtocolError(f"memory table payload of {len(data)} bytes")
        count, _ = cls._S.unpack_from(data)
        if count > MAX_TABLE_REGIONS:
            raise RemoteProtocolError(f"memory table with {count} regions")
        # QEMU sends the whole 8-region array; a shorter payload must still hold `count`.
        if len(data) < 8 + 32 * count or len(data) > 8 + 32 * MAX_TABLE_REGIONS:
            raise RemoteProtocolError(f"memory table of {count} regions in {len(data)} bytes")
        return cls(tuple(Region(*Region._S.unpack_from(data, 8 + 32 * i)) for i in range(count)))


@dataclass(frozen=True, slots=True)
class SingleRegion:
    """A single memory region description (ADD_MEM_REG, REM_MEM_REG)."""

    region: Region

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleRegion:
        _exact("single region", data, 40)
        return cls(Region(*Region._S.unpack_from(data, 8)))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """A device config space access: offset, flags and ``size`` bytes of data."""

    offset: int
    size: int
    flags: int
    data: bytes
    _S: ClassVar[struct.Struct] = struct.Struct("<III")

    def __post_init__(self) -> None:
        _fits(self._S, self.offset, self.size, self.flags)
        if self.size > MAX_CONFIG_SIZE or len(self.data) != self.size:
            raise ValueError(f"config access of {self.size} bytes with {len(self.data)} of data")

    def pack(self) -> bytes:
        return self._S.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        if len(data) < 12:
            raise RemoteProtocolError(f"config payload of {len(data)} bytes")
        offset, size, flags = cls._S.unpack_from(data)
        if size > MAX_CONFIG_SIZE or len(data) != 12 + size:
            raise RemoteProtocolError(f"config payload of {len(data)} bytes with size {size}")
        if offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
            raise RemoteProtocolError(f"config access {offset}+{size} out of range")
        return cls(offset, size, flags, bytes(data[12:]))


@dataclass(frozen=True, slots=True)
class Inflight:
    """An inflight description (GET_INFLIGHT_FD, SET_INFLIGHT_FD)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    #: QEMU and libvhost-user send sizeof(struct vhost_user_inflight): 20 bytes padded to 24.
    _S: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")

    def __post_init__(self) -> None:
        _fits(self._S, self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        _exact("inflight", data, cls._S.size)
        return cls(*cls._S.unpack(data))


PayloadType = (
    type[Empty]
    | type[U64]
    | type[VringState]
    | type[VringAddr]
    | type[MemTable]
    | type[SingleRegion]
    | type[ConfigSpace]
    | type[Inflight]
)
AnyPayload = Empty | U64 | VringState | VringAddr | MemTable | SingleRegion | ConfigSpace | Inflight


@dataclass(frozen=True, slots=True)
class Spec:
    """What a request carries: its payload kind, its reply's kind (None: no reply unless
    REPLY_ACK asks for one), and how many fds come with it (-1: decided by the payload)."""

    payload: PayloadType
    reply: PayloadType | None
    fds: int = 0


#: The message table: payload kinds per request, per direction (vhost-user.rst).
PAYLOADS: dict[Request, Spec] = {
    Request.GET_FEATURES: Spec(Empty, U64),
    Request.SET_FEATURES: Spec(U64, None),
    Request.SET_OWNER: Spec(Empty, None),
    Request.RESET_OWNER: Spec(Empty, None),
    Request.SET_MEM_TABLE: Spec(MemTable, None, -1),
    Request.SET_VRING_NUM: Spec(VringState, None),
    Request.SET_VRING_ADDR: Spec(VringAddr, None),
    Request.SET_VRING_BASE: Spec(VringState, None),
    Request.GET_VRING_BASE: Spec(VringState, VringState),
    Request.SET_VRING_KICK: Spec(U64, None, -1),
    Request.SET_VRING_CALL: Spec(U64, None, -1),
    Request.SET_VRING_ERR: Spec(U64, None, -1),
    Request.GET_PROTOCOL_FEATURES: Spec(Empty, U64),
    Request.SET_PROTOCOL_FEATURES: Spec(U64, None),
    Request.GET_QUEUE_NUM: Spec(Empty, U64),
    Request.SET_VRING_ENABLE: Spec(VringState, None),
    Request.SET_BACKEND_REQ_FD: Spec(Empty, None, 1),
    Request.GET_CONFIG: Spec(ConfigSpace, ConfigSpace),
    Request.SET_CONFIG: Spec(ConfigSpace, None),
    Request.GET_INFLIGHT_FD: Spec(Inflight, Inflight),
    Request.SET_INFLIGHT_FD: Spec(Inflight, None, 1),
    Request.RESET_DEVICE: Spec(Empty, None),
    Request.GET_MAX_MEM_SLOTS: Spec(Empty, U64),
    Request.ADD_MEM_REG: Spec(SingleRegion, None, 1),
    Request.REM_MEM_REG: Spec(SingleRegion, None, -1),
    Request.SET_STATUS: Spec(U64, None),
    Request.GET_STATUS: Spec(Empty, U64),
}


def expected_fds(request: Request, payload: AnyPayload) -> tuple[int, int]:
    """The least and most fds a request may carry."""
    spec = PAYLOADS[request]
    if spec.fds >= 0:
        return spec.fds, spec.fds
    if isinstance(payload, MemTable):
        return len(payload.regions), len(payload.regions)
    if isinstance(payload, U64):  # SET_VRING_KICK/CALL/ERR
        return (0, 0) if payload.value & VRING_NOFD_MASK else (1, 1)
    # REM_MEM_REG: QEMU sends the region's fd along; the backend ignores it.
    return 0, 1


@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message: request, header flags, payload and the fds that came with it."""

    request: Request
    payload: AnyPayload
    flags: int = Flags.VERSION
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & Flags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & Flags.NEED_REPLY)
