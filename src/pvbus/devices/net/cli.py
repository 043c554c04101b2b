"""``pvbus serve net``: arguments to a validated :class:`NetConfig` and a backend, then a device."""

from __future__ import annotations

import argparse
from typing import Any

from pvbus.devices.net.backends import (
    LoopbackBackend,
    NetBackend,
    TapBackend,
    connect_stream,
    connect_switch,
)
from pvbus.devices.net.device import NetConfig, NetDevice
from pvbus.devices.net.frames import parse_mac, random_mac

#: The backend program conventions' capabilities (vhost-user.rst, "net" type).
CAPABILITIES: dict[str, Any] = {"type": "net", "features": ["tap", "switch", "stream", "loopback"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device options of ``pvbus serve net``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tap", metavar="NAME", help="attach to (or create) tap interface NAME")
    where.add_argument("--switch", metavar="PATH", help="join the pvbus switch at PATH")
    where.add_argument(
        "--stream", metavar="PATH", help="connect to a -netdev stream peer (passt) at PATH"
    )
    where.add_argument(
        "--loopback", action="store_true", help="send transmitted frames back (benchmarks)"
    )
    parser.add_argument(
        "--vnet-hdr", action="store_true", help="open the tap with IFF_VNET_HDR (--tap only)"
    )
    parser.add_argument("--mac", help="MAC address (default: random 52:54:00:xx:xx:xx)")
    parser.add_argument("--queue-pairs", type=int, default=1, help="rx/tx queue pairs (default 1)")
    parser.add_argument(
        "--queue-size", type=int, default=1024, help="largest ring accepted (default 1024)"
    )
    parser.add_argument(
        "--no-mrg-rxbuf", action="store_true", help="do not offer VIRTIO_NET_F_MRG_RXBUF"
    )


def make_backend(args: argparse.Namespace) -> NetBackend:
    """Open the backend ``args`` name; raises ValueError with a one-line reason."""
    if args.tap:
        return TapBackend(args.tap, vnet_hdr=args.vnet_hdr)
    if args.vnet_hdr:
        raise ValueError("--vnet-hdr needs --tap")
    if args.switch:
        return connect_switch(args.switch)
    if args.stream:
        return connect_stream(args.stream)
    if args.loopback:
        return LoopbackBackend()
    raise ValueError("one of --tap, --switch, --stream or --loopback is required")


def make_device(args: argparse.Namespace) -> NetDevice:
    """Build the device; raises ValueError with a one-line reason."""
    config = NetConfig(
        mac=parse_mac(args.mac) if args.mac else random_mac(),
        queue_pairs=args.queue_pairs,
        queue_size=args.queue_size,
        mrg_rxbuf=not args.no_mrg_rxbuf,
    )
    return NetDevice(config, make_backend(args))
