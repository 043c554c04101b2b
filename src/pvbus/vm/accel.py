"""Pick QEMU's accelerator: KVM only where a stock guest kernel really runs on it.

``/dev/kvm`` alone proves little. On a nested "PVM" host (``kvm_pvm`` module) the device is
there but only PVM-enabled guest kernels run on it, and a host CPU without ``vmx``/``svm``
has no hardware virtualization to offer at all. Both get TCG, and so does a guest of another
architecture (an s390x guest on an x86-64 host).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ACCELS", "AccelChoice", "HostFacts", "choose_accel", "host_facts"]

ACCELS = ("auto", "kvm", "tcg")

_HW_MODULES = ("kvm_intel", "kvm_amd")


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the host tells about KVM; gathered by :func:`host_facts`, fakeable in tests."""

    kvm_device: bool
    kvm_accessible: bool
    modules: frozenset[str]
    cpu_flags: frozenset[str]
    #: The host's machine name as ``uname -m`` gives it.
    machine: str = field(default_factory=platform.machine)


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The chosen accelerator and why."""

    name: str
    reason: str


def _cpu_flags(cpuinfo: Path) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def host_facts(
    kvm: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> HostFacts:
    """Read the facts from this host."""
    names = ("kvm", "kvm_pvm", *_HW_MODULES)
    modules = frozenset(n for n in names if (sys_module / n).exists())
    return HostFacts(
        kvm_device=kvm.exists(),
        kvm_accessible=os.access(kvm, os.R_OK | os.W_OK),
        modules=modules,
        cpu_flags=_cpu_flags(cpuinfo),
    )


#: ``uname -m`` of a guest per Debian architecture.
_MACHINE_OF_ARCH = {"amd64": "x86_64", "s390x": "s390x"}


def choose_accel(
    requested: str = "auto", facts: HostFacts | None = None, *, guest_arch: str = "amd64"
) -> AccelChoice:
    """``kvm`` or ``tcg`` for ``requested`` in :data:`ACCELS`; ``kvm``/``tcg`` are obeyed.

    ``guest_arch`` is the guest's Debian architecture: KVM runs only the host's own.
    """
    if requested not in ACCELS:
        raise ValueError(f"unknown accelerator {requested!r} (choose from {', '.join(ACCELS)})")
    if requested != "auto":
        return AccelChoice(requested, "requested")
    f = facts or host_facts()
    guest_machine = _MACHINE_OF_ARCH.get(guest_arch, guest_arch)
    if guest_machine != f.machine:
        return AccelChoice("tcg", f"{guest_machine} guest on a {f.machine} host")
    if not f.kvm_device:
        return AccelChoice("tcg", "no /dev/kvm")
    if not f.kvm_accessible:
        return AccelChoice("tcg", "/dev/kvm is not readable and writable")
    if "kvm_pvm" in f.modules:
        return AccelChoice("tcg", "/dev/kvm is a PVM host (kvm_pvm): stock kernels cannot run")
    if not f.cpu_flags & {"vmx", "svm"}:
        return AccelChoice("tcg", "CPU has no vmx/svm: no hardware virtualization")
    if not f.modules & set(_HW_MODULES):
        return AccelChoice("tcg", "neither kvm_intel nor kvm_amd is loaded")
    return AccelChoice("kvm", "hardware KVM")
