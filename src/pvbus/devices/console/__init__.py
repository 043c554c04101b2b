"""virtio-console (VIRTIO 1.2 section 5.3) with host backends per port."""

from pvbus.devices.console.backends import (
    FileBackend,
    MemoryBackend,
    PortBackend,
    SocketBackend,
    StdioBackend,
    open_backend,
)
from pvbus.devices.console.device import ConsoleConfig, ConsoleDevice, PortSpec

__all__ = [
    "ConsoleConfig",
    "ConsoleDevice",
    "FileBackend",
    "MemoryBackend",
    "PortBackend",
    "PortSpec",
    "SocketBackend",
    "StdioBackend",
    "open_backend",
]
