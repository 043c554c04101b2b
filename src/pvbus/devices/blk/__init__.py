"""virtio-blk: block device model (VIRTIO 1.2 section 5.2)."""

from pvbus.devices.blk.device import BlkConfig, BlockDevice

__all__ = ["BlkConfig", "BlockDevice"]
