"""pvbus: paravirtual I/O in Python.

Virtio device models written once against guest memory and virtqueues, served to real VMs over
vhost-user, managed by a PV bus, driven by a userspace frontend, and proven by a VM runner.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
