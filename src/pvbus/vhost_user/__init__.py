"""vhost-user, sans-IO (QEMU docs/interop/vhost-user.rst).

Wire messages and their codec, and the backend and frontend state machines. Nothing here
touches a socket or an event loop: callers feed bytes and fds in and send what comes out.
"""

from pvbus.vhost_user.backend import BackendSession, RingListener
from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pvbus.vhost_user.messages import Flags, Message, ProtocolFeature, Request

__all__ = [
    "BackendSession",
    "Flags",
    "LocalProtocolError",
    "Message",
    "MessageReader",
    "ProtocolError",
    "ProtocolFeature",
    "RemoteProtocolError",
    "Request",
    "RingListener",
    "encode",
]
