"""Device models, each behind :class:`~pvbus.devices.base.VirtioDevice` and blind to transports."""

from pvbus.devices.base import VirtioDevice

__all__ = ["VirtioDevice"]
