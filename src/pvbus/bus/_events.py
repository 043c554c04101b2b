"""The bus's event log: numbered events kept in a ring, with waiters for the next one.

Event types: ``DEVICE_CREATED``, ``DEVICE_DELETED``; ``DEVADD`` / ``DEVDROP`` when a device
is plugged into / unplugged from a VM's bus; ``CONNECTED`` / ``DISCONNECTED`` (a vhost-user
frontend); status changes ``DRIVER_OK``, ``NEEDS_RESET`` and ``STATUS`` (any other change of
the virtio device status, e.g. a reset to 0); ``ERROR``; ``VM_START`` and ``VM_STOP``.
The bus emits an attachment's events between its ``DEVADD`` and its ``DEVDROP``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_TYPES", "Event", "EventLog"]

EVENT_TYPES = (
    "DEVICE_CREATED",
    "DEVICE_DELETED",
    "DEVADD",
    "DEVDROP",
    "CONNECTED",
    "DISCONNECTED",
    "DRIVER_OK",
    "NEEDS_RESET",
    "STATUS",
    "ERROR",
    "VM_START",
    "VM_STOP",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened on the bus; ``seq`` grows by one per event."""

    seq: int
    time: float
    type: str
    device: str | None = None
    vm: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "seq": self.seq,
            "time": self.time,
            "type": self.type,
            "device": self.device,
            "vm": self.vm,
            "detail": self.detail,
        }


class EventLog:
    """The last ``keep`` events; used from one asyncio loop."""

    def __init__(self, keep: int = 4096) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=keep)
        self._seq = 0
        self._changed = asyncio.Event()
        self.closed = False

    @property
    def last_seq(self) -> int:
        """The number of the newest event (0: none yet)."""
        return self._seq

    def emit(
        self,
        type_: str,
        *,
        device: str | None = None,
        vm: str | None = None,
        **detail: Any,
    ) -> Event:
        """Record an event and wake the waiters."""
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        self._seq += 1
        event = Event(self._seq, time.time(), type_, device, vm, detail)
        self._events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    def since(self, seq: int) -> list[Event]:
        """Events numbered above ``seq`` still kept, oldest first."""
        return [e for e in self._events if e.seq > seq]

    async def wait(self, seq: int, timeout: float) -> list[Event]:
        """Events above ``seq``, waiting up to ``timeout`` s for one if there are none."""
        events = self.since(seq)
        if events or self.closed:
            return events
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return []
        return self.since(seq)

    def close(self) -> None:
        """Wake every waiter for good (the daemon is stopping)."""
        self.closed = True
        self._changed.set()
