"""Serve devices from a background thread: for tests, examples and notebooks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pvbus.devices.base import VirtioDevice
from pvbus.server import EventLoop, VhostUserServer, listen_unix
from pvbus.vhost_user.backend import Limits


class LoopThread:
    """An :class:`~pvbus.server.EventLoop` running in a daemon thread.

    Register what the loop should serve on :attr:`loop`, then :meth:`start`; :meth:`stop`
    wakes the loop through an eventfd and joins the thread.
    """

    def __init__(self) -> None:
        self.loop = EventLoop()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._wake, self.loop.stop)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for the thread (the loop stays open for clean-up)."""
        os.eventfd_write(self._wake, 1)
        self.thread.join(5)

    def close(self) -> None:
        """Release the loop and the wake-up fd (after :meth:`stop`)."""
        self.loop.close()
        os.close(self._wake)


class ServedDevice:
    """``device`` served over vhost-user on a Unix socket at ``path`` by a :class:`LoopThread`.

    ``server`` lets a test replace the :class:`VhostUserServer` (e.g. one that offers fewer
    protocol features). Closing stops the loop, the server and the device (if it has
    ``close``).
    """

    def __init__(
        self,
        device: VirtioDevice,
        path: str | Path,
        *,
        limits: Limits | None = None,
        server: type[VhostUserServer] = VhostUserServer,
    ) -> None:
        self.device = device
        self.path = Path(path)
        self._thread = LoopThread()
        self.loop = self._thread.loop
        self.server = server(device, listen_unix(str(path)), self.loop, limits)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the loop thread still runs."""
        return self._thread.thread.is_alive()

    def close(self) -> None:
        self._thread.stop()
        self.server.close()
        self._thread.close()
        close = getattr(self.device, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ServedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
