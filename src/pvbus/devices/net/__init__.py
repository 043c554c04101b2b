"""virtio-net (VIRTIO 1.2 section 5.1) with tap, pvbus-switch and stream (passt) backends."""

from pvbus.devices.net.backends import (
    BackendClosedError,
    LoopbackBackend,
    NetBackend,
    SeqpacketBackend,
    StreamBackend,
    TapBackend,
    connect_stream,
    connect_switch,
)
from pvbus.devices.net.device import CTRL_ERR, CTRL_OK, NetConfig, NetDevice, NetStats
from pvbus.devices.net.frames import format_mac, parse_mac, random_mac
from pvbus.devices.net.switch import LearningSwitch, SwitchServer, listen_seqpacket

__all__ = [
    "CTRL_ERR",
    "CTRL_OK",
    "BackendClosedError",
    "LearningSwitch",
    "LoopbackBackend",
    "NetBackend",
    "NetConfig",
    "NetDevice",
    "NetStats",
    "SeqpacketBackend",
    "StreamBackend",
    "SwitchServer",
    "TapBackend",
    "connect_stream",
    "connect_switch",
    "format_mac",
    "listen_seqpacket",
    "parse_mac",
    "random_mac",
]
