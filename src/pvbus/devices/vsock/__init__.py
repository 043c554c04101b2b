"""virtio-vsock (VIRTIO 1.2 section 5.10) with guest ports mapped to host Unix sockets."""

from pvbus.devices.vsock.device import HOST_CID, VsockConfig, VsockDevice

__all__ = ["HOST_CID", "VsockConfig", "VsockDevice"]
