"""Ethernet frames and the virtio-net header (VIRTIO 1.2 section 5.1.6): pure helpers, no I/O."""

from __future__ import annotations

import os
import struct

__all__ = [
    "BROADCAST",
    "ETH_HLEN",
    "HDR_LEN",
    "HDR_LEN_LEGACY",
    "MAX_FRAME",
    "NET_HDR",
    "format_mac",
    "is_multicast",
    "parse_mac",
    "random_mac",
]

#: Ethernet header: destination, source, EtherType.
ETH_HLEN = 14
#: Largest frame carried without segmentation offloads: 64 KiB of payload plus headers
#: (Linux caps a virtio-net MTU at 65535 without VIRTIO_NET_F_MTU) and a VLAN tag.
MAX_FRAME = 65535 + ETH_HLEN + 4
BROADCAST = b"\xff" * 6

#: ``struct virtio_net_hdr`` (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers. ``num_buffers`` exists with VERSION_1 or MRG_RXBUF.
NET_HDR = struct.Struct("<BBHHHHH")
HDR_LEN = NET_HDR.size
HDR_LEN_LEGACY = HDR_LEN - 2

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or ``-`` separated) to 6 bytes; ValueError if malformed."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"bad MAC address {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError as err:
        raise ValueError(f"bad MAC address {text!r}") from err
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is multicast")
    return mac


def format_mac(mac: bytes) -> str:
    """6 bytes to ``52:54:00:12:34:56``."""
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random locally administered unicast address in QEMU's 52:54:00 prefix."""
    return b"\x52\x54\x00" + os.urandom(3)


def is_multicast(mac: bytes | memoryview) -> bool:
    """Whether a destination address is multicast or broadcast (I/G bit set)."""
    return bool(mac[0] & 1)
