"""The driver side of vhost-user: drive any vhost-user backend from Python, with no VM.

Like DPDK's virtio-user or libblkio: :class:`VhostUserFrontend` is the device-agnostic
connection (memfd guest memory, feature negotiation, config space, split virtqueues with kick
and call eventfds) on the sans-IO :class:`pvbus.vhost_user.frontend.FrontendSession`;
:class:`BlockClient` and :class:`AsyncBlockClient` are a virtio-blk driver on top. Other device
clients build on :class:`VhostUserFrontend` the same way.
"""

from pvbus.frontend._connection import (
    BackendDisconnectedError,
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

__all__ = [
    "AsyncBlockClient",
    "BackendDisconnectedError",
    "BlkGeometry",
    "BlockClient",
    "BlockError",
    "BlockQueue",
    "Completion",
    "FrontendError",
    "FrontendQueue",
    "GuestBuffer",
    "MemfdMemory",
    "Op",
    "OutOfGuestMemoryError",
    "QueueFullError",
    "RequestFailedError",
    "Status",
    "VhostUserFrontend",
]
