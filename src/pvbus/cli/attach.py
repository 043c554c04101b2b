"""``pvbus attach|detach|events|stats``: hot-plug, the event stream and the counters."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pvbus.cli._bus import add_api_socket, client, dump, table


def register(sub: Any) -> None:
    attach = sub.add_parser("attach", help="hot-plug a bus device into a running VM")
    add_api_socket(attach)
    attach.add_argument("device")
    attach.add_argument("--vm", required=True, help="the VM to plug it into")
    attach.set_defaults(handler=_attach)

    detach = sub.add_parser("detach", help="hot-unplug a device from its VM")
    add_api_socket(detach)
    detach.add_argument("device")
    detach.set_defaults(handler=_detach)

    events = sub.add_parser("events", help="the bus's events (DEVADD, DEVDROP, DRIVER_OK, ...)")
    add_api_socket(events)
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--since", type=int, default=0, help="only events numbered above this")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(handler=_events)

    stats = sub.add_parser(
        "stats",
        help="per-queue counters of bus devices (a row per queue; P50/P99: batch latency bounds)",
    )
    add_api_socket(stats)
    stats.add_argument("device", nargs="?", help="one device (default: all)")
    stats.add_argument("--json", action="store_true", help="the raw counters as JSON")
    stats.set_defaults(handler=_stats)


def _attach(args: argparse.Namespace) -> int:
    with client(args) as bus:
        info = bus.attach(args.device, args.vm)
    print(f"{info['id']} attached to {info['vm']} on {info['bus']} ({info['qdev']})")
    return 0


def _detach(args: argparse.Namespace) -> int:
    with client(args) as bus:
        bus.detach(args.device)
    return 0


def _format_event(e: dict[str, Any]) -> str:
    millis = int(e["time"] % 1 * 1000)
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{millis:03d}"
    where = " ".join(f"{k}={e[k]}" for k in ("device", "vm") if e.get(k))
    detail = " ".join(f"{k}={v}" for k, v in e.get("detail", {}).items())
    return f"{e['seq']:>5} {stamp} {e['type']:<14} {where} {detail}".rstrip()


def _events(args: argparse.Namespace) -> int:
    import json

    with client(args) as bus:
        source = bus.follow_events(args.since) if args.follow else bus.events(args.since)
        for event in source:
            print(json.dumps(event) if args.json else _format_event(event), flush=True)
    return 0


def percentile(latency: list[int], fraction: float) -> float | None:
    """Upper bound (seconds) of the histogram bucket holding the ``fraction`` quantile."""
    from pvbus.bus import LATENCY_BOUNDS

    total = sum(latency)
    if not total:
        return None
    seen = 0
    for b, count in enumerate(latency):
        seen += count
        if seen >= fraction * total:
            return LATENCY_BOUNDS[b] if b < len(LATENCY_BOUNDS) else float("inf")
    return float("inf")


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return ">16ms" if value == float("inf") else f"<{value * 1e6:.0f}us"


def _stats(args: argparse.Namespace) -> int:
    with client(args) as bus:
        if args.device:
            kind = bus.device(args.device)["type"]
            stats = {args.device: {"type": kind, **bus.stats(args.device)}}
        else:
            stats = bus.stats()
    if args.json:
        dump(stats)
        return 0
    rows = []
    for dev, s in stats.items():
        for i, q in enumerate(s["queues"]):
            rows.append(
                (
                    dev,
                    i,
                    q["requests"],
                    q["bytes"],
                    q["kicks"],
                    q["calls"],
                    q["coalesced"],
                    q["errors"],
                    q["in_flight"],
                    _us(percentile(q["latency"], 0.5)),
                    _us(percentile(q["latency"], 0.99)),
                )
            )
    header = (
        "DEVICE",
        "Q",
        "REQUESTS",
        "BYTES",
        "KICKS",
        "CALLS",
        "COALESCED",
        "ERRORS",
        "INFLIGHT",
        "P50",
        "P99",
    )
    print(table(rows, header))
    return 0
