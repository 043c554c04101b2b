"""A minimal epoll event loop: a callback per readable fd, signals turned into a clean stop."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class EventLoop:
    """Calls ``callback()`` whenever a registered fd is readable, until :meth:`stop`.

    ``pollers`` run after every wake-up and, while any is registered, at least every
    millisecond (for rings the frontend asked us to poll). :meth:`call_later` runs a callback
    once after a delay. The loop satisfies :class:`pvbus.devices.base.Reactor`.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self.pollers: dict[object, Callable[[], None]] = {}
        self._running = False
        self._wakeup_r = -1
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch ``fd`` for input (replacing any earlier callback)."""
        if fd in self._readers:
            self._readers[fd] = callback
            return
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (no error if it was not watched)."""
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` once, ``delay`` seconds from now."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), callback))

    def stop(self) -> None:
        """Make :meth:`run` return after the current callback."""
        self._running = False

    def stop_on_signals(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Stop the loop cleanly on these signals (through a wake-up pipe, never mid-request)."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda *_: None)

        def drain() -> None:
            try:
                data = os.read(r, 64)
            except BlockingIOError:
                return
            if data:
                log.info("signal %s: stopping", ", ".join(str(b) for b in data))
                self.stop()

        self.add_reader(r, drain)

    def run(self) -> None:
        """Dispatch events until :meth:`stop`."""
        self._running = True
        poll = self._epoll.poll
        readers = self._readers
        timers = self._timers
        while self._running:
            timeout = 0.001 if self.pollers else -1.0
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    heapq.heappop(timers)[2]()
                if timers:
                    wait = timers[0][0] - now
                    timeout = wait if timeout < 0 else min(wait, timeout)
            events = poll(timeout)
            for fd, _ in events:
                callback = readers.get(fd)
                if callback is not None:
                    callback()
                    if not self._running:
                        return
            if self.pollers:
                for poller in list(self.pollers.values()):
                    poller()

    def close(self) -> None:
        """Release the epoll fd."""
        if self._wakeup_r >= 0:
            signal.set_wakeup_fd(-1)
        self._epoll.close()
