"""The PV bus: a daemon hosting device backends (one worker process each), VMs and their buses,
hot-plug over QMP, events, stats, and a REST API on a Unix socket.

Modules: :mod:`pvbus.bus.api` (the FastAPI app), :mod:`pvbus.bus.daemon` (serving it),
:mod:`pvbus.bus.client` (the CLI's client). Light, import-cheap pieces are re-exported here;
the worker process imports only these.
"""

from pvbus.bus._events import EVENT_TYPES, Event, EventLog
from pvbus.bus._registry import (
    QEMU_DRIVERS,
    DeviceType,
    QemuDriver,
    UnknownDeviceTypeError,
    device_type,
    device_types,
)
from pvbus.bus._stats import LATENCY_BOUNDS, DeviceSnapshot, QueueSnapshot, StatsBlock

__all__ = [
    "EVENT_TYPES",
    "LATENCY_BOUNDS",
    "QEMU_DRIVERS",
    "DeviceSnapshot",
    "DeviceType",
    "Event",
    "EventLog",
    "QemuDriver",
    "QueueSnapshot",
    "StatsBlock",
    "UnknownDeviceTypeError",
    "device_type",
    "device_types",
]
