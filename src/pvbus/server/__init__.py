"""The I/O layer: the only place with sockets, eventfds and the event loop.

:class:`EventLoop` is a thin epoll loop (a callback per readable fd, no per-event objects);
:class:`VhostUserServer` listens on a Unix socket, feeds one frontend connection at a time
into a :class:`~pvbus.vhost_user.BackendSession`, and routes ring kicks to the device.
"""

from pvbus.server.loop import EventLoop
from pvbus.server.vhost import VhostUserServer, listen_unix

__all__ = ["EventLoop", "VhostUserServer", "listen_unix"]
