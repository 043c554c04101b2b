"""The driver side of vhost-user: drive any vhost-user backend from Python, with no VM.

Like DPDK's virtio-user or libblkio: :class:`VhostUserFrontend` is the device-agnostic
connection (memfd guest memory, feature negotiation, config space, split or packed virtqueues
with kick and call eventfds) on the sans-IO :class:`pvbus.vhost_user.frontend.FrontendSession`;
:class:`BlockClient` and :class:`AsyncBlockClient` are a virtio-blk driver on top;
:class:`NetClient`, :class:`RngClient`, :class:`ConsoleClient` and :class:`VsockClient` drive
the other devices. Every client is a :class:`DeviceClient`: it owns its connection, closes it,
and is a context manager; ``connect(..., packed=True)`` asks for packed rings.
"""

from pvbus.frontend._connection import (
    BackendDisconnectedError,
    DeviceClient,
    FrontendError,
    FrontendQueue,
    RequestFailedError,
    VhostUserFrontend,
)
from pvbus.frontend._memory import GuestBuffer, MemfdMemory, OutOfGuestMemoryError
from pvbus.frontend.aio import AsyncBlockClient
from pvbus.frontend.blk import (
    BlkGeometry,
    BlockClient,
    BlockError,
    BlockQueue,
    Completion,
    Op,
    QueueFullError,
    Status,
)
from pvbus.frontend.console import ConsoleClient
from pvbus.frontend.net import NetClient
from pvbus.frontend.rng import RngClient
from pvbus.frontend.vsock import VsockClient

__all__ = [
    "AsyncBlockClient",
    "BackendDisconnectedError",
    "BlkGeometry",
    "BlockClient",
    "BlockError",
    "BlockQueue",
    "Completion",
    "ConsoleClient",
    "DeviceClient",
    "FrontendError",
    "FrontendQueue",
    "GuestBuffer",
    "MemfdMemory",
    "NetClient",
    "Op",
    "OutOfGuestMemoryError",
    "QueueFullError",
    "RequestFailedError",
    "RngClient",
    "Status",
    "VhostUserFrontend",
    "VsockClient",
]
