"""virtio-rng (VIRTIO 1.2 section 5.4)."""

from pvbus.devices.rng.device import RngConfig, RngDevice

__all__ = ["RngConfig", "RngDevice"]
